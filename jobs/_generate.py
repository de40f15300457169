"""A direct summarization run over local prompts: decode, write Parquet, report throughput."""

from __future__ import annotations

import platform
import socket
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from dflash_batch.decoder import Decoder, Request, Result, TargetModel
from dflash_batch.schemas import COMPLETIONS_SCHEMA


def completion_row(r: Result, model: str, mode: str, drafter: str = "") -> dict:
    """A completions-schema row for one finished request."""
    steps = int(r.accepted_per_step.sum())
    return {
        "id": r.id, "completion": r.text, "completion_token_ids": r.token_ids, "finish_reason": r.finish_reason,
        "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens, "decode_steps": steps,
        "acceptance_length_mean": r.tau, "accepted_per_step": [int(x) for x in r.accepted_per_step],
        "draft_tokens_proposed": r.draft_tokens_proposed, "draft_tokens_accepted": r.draft_tokens_accepted,
        "bucket": r.bucket, "batch_index": 0, "worker": socket.gethostname(), "decode_seconds": r.decode_seconds,
        "model": model, "drafter": drafter, "mode": mode,
    }


def run_generate(target: TargetModel, requests: Sequence[Request], output: Path, batch_size: int,
                 max_new_tokens: int) -> dict:
    """Decodes every request with a progress bar and writes ``output/completions-00000.parquet``."""
    dec = Decoder(target, batch_size=batch_size, max_new_tokens=max_new_tokens)
    compile_s = dec.warmup(max(dec.bucket(len(r.token_ids)) for r in requests))
    rows, n_tokens = [], 0
    t0 = time.perf_counter()
    with tqdm(total=len(requests), unit="row", desc="decode") as bar:
        for r in dec.generate(requests):
            rows.append(completion_row(r, target.name, dec.mode))
            n_tokens += r.completion_tokens
            bar.update(1)
            bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - t0):.1f}")
    wall = time.perf_counter() - t0
    output.mkdir(parents=True, exist_ok=True)
    path = output / "completions-00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=COMPLETIONS_SCHEMA), path)
    return {"path": str(path), "rows": len(rows), "completion_tokens": n_tokens, "decode_seconds": wall,
            "tokens_per_s": n_tokens / wall, "compile_seconds": compile_s, "hardware": platform.processor() or platform.machine(),
            "finish_reasons": {k: int(v) for k, v in zip(*np.unique([r["finish_reason"] for r in rows], return_counts=True))}}
