"""Side-by-side throughput: our decoder against Hugging Face ``generate`` on the same prompts.

Every number is measured in one process on one machine, and each cell is the
median of ``repeats`` runs, because a shared CPU is noisy.
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

from dflash_batch.decoder import Decoder, Request, TargetModel


def our_runs(target: TargetModel, requests: Sequence[Request], batch_size: int, max_new_tokens: int,
             repeats: int, mode: str = "ar") -> tuple[list[float], dict[str, list[int]], float]:
    """Tokens/s of each repeat, the token ids of the last repeat, and compile seconds."""
    dec = Decoder(target, mode=mode, batch_size=batch_size, max_new_tokens=max_new_tokens)
    compile_s = dec.warmup(max(dec.bucket(len(r.token_ids)) for r in requests))
    speeds, tokens = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        results = list(dec.generate(requests))
        dt = time.perf_counter() - t0
        speeds.append(sum(r.completion_tokens for r in results) / dt)
        tokens = {r.id: r.token_ids for r in results}
    return speeds, tokens, compile_s


def hf_runs(target: TargetModel, requests: Sequence[Request], batch_size: int, max_new_tokens: int,
            repeats: int) -> tuple[list[float], dict[str, list[int]]]:
    """The same greedy job through transformers' PyTorch ``generate`` (fp32, left-padded batches)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target.path), dtype=torch.float32).eval()
    eos = list(target.eos_token_ids)
    pad = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else eos[0]
    speeds, tokens = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        n_tokens = 0
        for i in range(0, len(requests), batch_size):
            chunk = requests[i : i + batch_size]
            width = max(len(r.token_ids) for r in chunk)
            ids = torch.tensor([[pad] * (width - len(r.token_ids)) + list(r.token_ids) for r in chunk])
            mask = torch.tensor([[0] * (width - len(r.token_ids)) + [1] * len(r.token_ids) for r in chunk])
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=eos, pad_token_id=pad)
            for r, row in zip(chunk, out[:, width:].tolist()):
                cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
                tokens[r.id] = row[:cut]
                n_tokens += cut
        speeds.append(n_tokens / (time.perf_counter() - t0))
    return speeds, tokens


def identical_fraction(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    keys = sorted(set(a) & set(b))
    return sum(a[k] == b[k] for k in keys) / max(len(keys), 1)


def bench_ar(target: TargetModel, requests: Sequence[Request], batch_sizes: Sequence[int], max_new_tokens: int,
             repeats: int = 3, with_hf: bool = True, progress=None) -> list[dict]:
    """One row per (batch size, engine) with median tokens/s and speedup over transformers."""
    rows = []
    for b in batch_sizes:
        ours, our_tokens, compile_s = our_runs(target, requests, b, max_new_tokens, repeats)
        row = {"batch_size": b, "mode": "ar", "ar_tokens_per_s": statistics.median(ours),
               "ar_runs": ours, "compile_seconds": compile_s}
        if progress:
            progress(f"batch {b}: ours {row['ar_tokens_per_s']:.1f} tok/s")
        if with_hf:
            hf, hf_tokens = hf_runs(target, requests, b, max_new_tokens, repeats)
            row.update(hf_tokens_per_s=statistics.median(hf), hf_runs=hf,
                       speedup_vs_hf=row["ar_tokens_per_s"] / statistics.median(hf),
                       identical_fraction=identical_fraction(our_tokens, hf_tokens))
            if progress:
                progress(f"batch {b}: transformers {row['hf_tokens_per_s']:.1f} tok/s")
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    head = f"{'batch':>5}  {'ours tok/s':>10}  {'HF tok/s':>9}  {'speedup':>8}  {'identical':>9}  {'compile s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        has_hf = r.get("hf_tokens_per_s") is not None
        hf = f"{r['hf_tokens_per_s']:.1f}" if has_hf else "-"
        speedup = f"{r['speedup_vs_hf']:.2f}x" if has_hf else "-"
        same = f"{r['identical_fraction']:.0%}" if has_hf else "-"
        lines.append(f"{r['batch_size']:>5}  {r['ar_tokens_per_s']:>10.1f}  {hf:>9}  {speedup:>8}  {same:>9}  "
                     f"{r['compile_seconds']:>9.1f}")
    return "\n".join(lines)
