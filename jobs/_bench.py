"""Side-by-side throughput on the same prompts, in one process on one machine.

For each batch size it runs plain AR (the lossless reference and the speedup
denominator), then every speculative mode at every block length asked for, plus
the automatic block choice, and optionally Hugging Face ``generate``. Each cell is
the median of ``repeats`` runs (a shared CPU is noisy); outputs are compared with
AR's token for token.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import numpy as np

from dflash_batch.decoder import DRAFTER_MODES, Decoder, Request, TargetModel


def run_mode(target: TargetModel, requests: Sequence[Request], batch_size: int, max_new_tokens: int, repeats: int,
             mode: str = "ar", drafter=None, block_size: int | str = "auto") -> dict:
    """Median tokens/s over repeats, tau, the token ids (last repeat) and compile seconds."""
    dec = Decoder(target, mode=mode, batch_size=batch_size, max_new_tokens=max_new_tokens,
                  drafter=drafter, block_size=block_size)
    compile_s = dec.warmup(max(dec.bucket(len(r.token_ids)) for r in requests))
    speeds, results = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        results = list(dec.generate(requests))
        speeds.append(sum(r.completion_tokens for r in results) / (time.perf_counter() - t0))
    hist = sum((r.accepted_per_step for r in results), np.zeros(dec.block_size, np.int64))
    steps = int(hist.sum())
    tau = float((hist * np.arange(1, len(hist) + 1)).sum() / steps) if steps else 1.0
    out = {"tokens_per_s": statistics.median(speeds), "runs": speeds, "tau": tau,
           "tokens": {r.id: r.token_ids for r in results}, "compile_seconds": compile_s}
    report = dec.block_report()
    if block_size == "auto" and mode != "ar":
        out["auto"] = report
    if mode == "hybrid":
        out["hybrid"] = {k: v["hybrid"] for k, v in report.items() if "hybrid" in v}
    return out


def hf_run(target: TargetModel, requests: Sequence[Request], batch_size: int, max_new_tokens: int,
           repeats: int) -> dict:
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
    return {"tokens_per_s": statistics.median(speeds), "runs": speeds, "tokens": tokens}


def identical_fraction(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    keys = sorted(set(a) & set(b))
    return sum(a[k] == b[k] for k in keys) / max(len(keys), 1)


def bench(target: TargetModel, requests: Sequence[Request], batch_sizes: Sequence[int], max_new_tokens: int, *,
          repeats: int = 3, drafter=None, block_sizes: Sequence[int] = (8, 16), modes: Sequence[str] = ("dflash", "ngram", "hybrid"),
          with_hf: bool = False, progress: Callable[[str], None] | None = None) -> list[dict]:
    """One row per (batch size, mode, block size), each with AR's numbers beside it."""
    say = progress or (lambda _m: None)
    rows = []
    for b in batch_sizes:
        ar = run_mode(target, requests, b, max_new_tokens, repeats)
        say(f"batch {b}: ar {ar['tokens_per_s']:.1f} tok/s")
        base = {"batch_size": b, "ar_tokens_per_s": ar["tokens_per_s"], "ar_runs": ar["runs"]}
        rows.append({**base, "mode": "ar", "block_size": 1, "tokens_per_s": ar["tokens_per_s"], "tau_mean": 1.0,
                     "speedup": 1.0, "identical_fraction": 1.0, "compile_seconds": ar["compile_seconds"]})
        if with_hf:
            hf = hf_run(target, requests, b, max_new_tokens, repeats)
            say(f"batch {b}: transformers {hf['tokens_per_s']:.1f} tok/s")
            rows.append({**base, "mode": "hf-generate", "block_size": 1, "tokens_per_s": hf["tokens_per_s"],
                         "runs": hf["runs"], "tau_mean": 1.0, "speedup": hf["tokens_per_s"] / ar["tokens_per_s"],
                         "identical_fraction": identical_fraction(hf["tokens"], ar["tokens"]), "compile_seconds": 0.0})
        for mode in modes:
            if mode in DRAFTER_MODES and drafter is None:
                continue
            for blk in [*block_sizes, "auto"]:
                if mode in DRAFTER_MODES and blk != "auto" and blk > drafter[0].block_size:
                    continue
                r = run_mode(target, requests, b, max_new_tokens, repeats, mode=mode, drafter=drafter, block_size=blk)
                row = {**base, "mode": mode, "block_size": blk, "tokens_per_s": r["tokens_per_s"], "runs": r["runs"],
                       "tau_mean": r["tau"], "speedup": r["tokens_per_s"] / ar["tokens_per_s"],
                       "identical_fraction": identical_fraction(r["tokens"], ar["tokens"]),
                       "compile_seconds": r["compile_seconds"]}
                for key in ("auto", "hybrid"):
                    if key in r:
                        row[key] = r[key]
                if mode == "dflash":
                    row["dflash_tokens_per_s"] = r["tokens_per_s"]
                rows.append(row)
                say(f"batch {b}: {mode} L={blk} {r['tokens_per_s']:.1f} tok/s tau {r['tau']:.2f}")
    return rows


def format_table(rows: Sequence[dict]) -> str:
    head = (f"{'batch':>5}  {'mode':<11}  {'block':>5}  {'tok/s':>7}  {'tau':>5}  {'vs AR':>6}  "
            f"{'identical':>9}  {'compile s':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['batch_size']:>5}  {r['mode']:<11}  {r['block_size']!s:>5}  {r['tokens_per_s']:>7.1f}  "
                     f"{r['tau_mean']:>5.2f}  {r['speedup']:>5.2f}x  {r['identical_fraction']:>9.0%}  "
                     f"{r['compile_seconds']:>9.1f}")
    return "\n".join(lines)
