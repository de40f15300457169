"""The decode step: a static batch in, completion rows and one stats record out.

The DoFn is a thin edge around the decoder: it takes the process's shared model (loaded once,
see ``_model``), streams the batch through the decoder's slots, and turns each ``Result`` into a
completions-schema row carrying the input's own columns. If the decoder fails mid-batch, rows
that finished are still completions, and the others become dead letters with the error, so one
failure never fails the bundle (a retry would fail the same way).

Its rows are saved as it goes: each batch's completions and dead letters join the worker's
next part (``_parts``), which is written once full or old enough, and at the end of the bundle,
before the rows are handed on. So a crash loses at most one unwritten part per worker.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import Any, Iterable, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics

from dflash_batch.decoder import Result
from dflash_batch.pipeline._config import JobConfig
from dflash_batch.pipeline._io import COMPLETIONS_PREFIX, DEAD_LETTERS_PREFIX
from dflash_batch.pipeline._model import ModelKey, shared_model
from dflash_batch.pipeline._parts import PartBuffer
from dflash_batch.pipeline._rows import DEAD, NAMESPACE
from dflash_batch.pipeline._tokenize import Prepared
from dflash_batch.schemas import DEAD_LETTERS_SCHEMA, add_histograms, committed_tokens, dead_letter_key, dead_letter_row

STATS = "batch_stats"


def model_key(config: JobConfig) -> ModelKey:
    return ModelKey(model=config.spec.model.target, drafter=config.drafter, decode=config.spec.decode,
                    dtype=config.dtype)


def drafter_id(config: JobConfig) -> str | None:
    """What the completions' ``drafter`` column records: null in mode ar."""
    return {"ar": None, "ngram": "ngram"}.get(config.spec.decode.mode, config.drafter)


def batch_index(ids: Sequence[str]) -> int:
    """Rows decoded in the same batch share this number (a hash of the batch's ids)."""
    digest = hashlib.blake2b("\n".join(sorted(ids)).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def completion_row(r: Result, item: Prepared, config: JobConfig, columns: Sequence[str], batch: int,
                   worker: str) -> dict[str, Any]:
    """One row of the job's completions schema (``columns``), the input's own columns included."""
    row = {
        "id": r.id, "completion": r.text, "completion_token_ids": [int(t) for t in r.token_ids],
        "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens, "decode_steps": int(r.decode_steps),
        "acceptance_length_mean": r.tau, "accepted_per_step": [int(x) for x in r.accepted_per_step],
        "draft_tokens_proposed": int(r.draft_tokens_proposed), "draft_tokens_accepted": int(r.draft_tokens_accepted),
        "bucket": item.bucket, "batch_index": batch, "worker": worker, "decode_seconds": float(r.decode_seconds),
        "model": config.spec.model.target, "drafter": drafter_id(config), "mode": config.spec.decode.mode,
        "dtype": config.dtype,
        "prompt_truncated_tokens": item.truncated,
    }
    for name in columns:
        if name not in row:
            row[name] = item.row.get(name)
    return row


class Decode(beam.DoFn):
    """((bucket, shard), [Prepared]) -> completion rows; dead letters and one stats record tagged.
    Every row handed on is already saved in a part (or is in the part ``finish_bundle`` writes)."""

    def __init__(self, config: JobConfig, schema: pa.Schema):
        self.config = config
        self.schema = schema
        self.columns = tuple(schema.names)

    def setup(self):
        from dflash_batch.pipeline._io import use_anonymous_gcs_for_emulator
        from dflash_batch.pipeline._progress import ProgressLog
        from dflash_batch.pipeline._worker_env import apply_worker_env

        apply_worker_env(self.config.spec)  # before JAX starts: libtpu reads them once
        use_anonymous_gcs_for_emulator()
        self.progress = ProgressLog(self.config.progress_dir)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.key = model_key(self.config)
        self.model_loads = Metrics.counter(NAMESPACE, "model_loads")
        self.completions = Metrics.counter(NAMESPACE, "completions")
        self.prompt_tokens = Metrics.counter(NAMESPACE, "prompt_tokens")
        self.completion_tokens = Metrics.counter(NAMESPACE, "completion_tokens")
        self.tau = Metrics.distribution(NAMESPACE, "tau_x1000")  # Beam distributions hold integers
        self.latency = Metrics.distribution(NAMESPACE, "batch_latency_ms")
        self.batch_rows = Metrics.distribution(NAMESPACE, "batch_rows")
        out, per_file = self.config.output, self.config.rows_per_file
        self.completion_part = PartBuffer(out, COMPLETIONS_PREFIX, self.schema, per_file)
        self.dead_part = PartBuffer(out, DEAD_LETTERS_PREFIX, DEAD_LETTERS_SCHEMA, per_file)
        self.rows_seen = 0  # rows this instance was given to decode

    def finish_bundle(self):
        # Beam commits the bundle's output only after this returns: the rows are on disk first.
        self.completion_part.flush()
        self.dead_part.flush()

    def _rows_after(self, batch_rows: int) -> int | None:
        """The rows this decoder may still get after a batch of ``batch_rows``: at most the rest of
        the job's rows (None where the preflight did not count them), what a compile pays back over."""
        self.rows_seen += batch_rows
        return max(self.config.rows_in - self.rows_seen, 0) if self.config.rows_in else None

    def process(self, element: tuple[tuple[int, int], Iterable[Prepared]]):
        (bucket, _shard), batch = element
        items = list(batch)
        # Loaded lazily, on the first batch: a process that never decodes never loads the model.
        model, loaded_now = shared_model(self.key, before_load=lambda: self.progress.phase("loading"))
        if loaded_now:
            self.model_loads.inc()
        results: dict[str, Result] = {}
        error = None
        with model.lock:
            t0 = time.perf_counter()
            compiled_before = model.decoder.compile_seconds
            try:
                if bucket not in model.warm:  # the first batch of this bucket in this process
                    self.progress.phase("compiling", bucket)
                    model.decoder.warmup(bucket, lazy=True)  # larger block lengths when they could pay
                    model.warm.add(bucket)
                self.progress.phase("decoding", bucket)
                for r in model.decoder.generate([it.request() for it in items], bucket=bucket,
                                                rows_after=self._rows_after(len(items))):
                    results[r.id] = r
                    h = np.asarray(r.accepted_per_step, np.int64)
                    self.progress.report(rows=1, completion_tokens=r.completion_tokens, steps=int(h.sum()),
                                         committed=committed_tokens(h))
            except Exception as e:  # noqa: BLE001 - rows become dead letters; the bundle goes on
                error = f"decode failed: {type(e).__name__}: {e}"
                try:  # the slots may hold half-finished rows: start the next batch from fresh slots
                    model.warm.discard(bucket)
                    model.decoder.reset(bucket)
                except Exception:  # noqa: BLE001
                    pass
            compile_seconds = model.decoder.compile_seconds - compiled_before
            seconds = time.perf_counter() - t0
            # Cumulative for this worker's batch of this bucket: block lengths measured and chosen, and why.
            try:
                decoder_report = model.decoder.block_report().get(str(bucket), {})
            except Exception:  # noqa: BLE001 - a report is never worth failing the bundle's rows
                decoder_report = {}
        index = batch_index([it.id for it in items])

        done = [(it, results[it.id]) for it in items if it.id in results]
        rows = [completion_row(r, it, self.config, self.columns, index, self.worker) for it, r in done]
        reason = error or "decode failed: the decoder returned no result for this row"
        dead = [dead_letter_row(it.row, "decode_failed", reason, it.source) for it in items if it.id not in results]
        self.completion_part.add(rows, [row["id"] for row in rows])
        self.dead_part.add(dead, [dead_letter_key(d) for d in dead])
        hist: list[int] = []  # grows to the decoder's block size
        for _, r in done:
            hist = add_histograms(hist, r.accepted_per_step)
            self.tau.update(int(round(r.tau * 1000)))
        yield from rows
        for d in dead:
            yield beam.pvalue.TaggedOutput(DEAD, d)

        prompt_tokens = sum(r.prompt_tokens for _, r in done)
        completion_tokens = sum(r.completion_tokens for _, r in done)
        self.completions.inc(len(done))
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        self.latency.update(int(seconds * 1000))
        self.batch_rows.update(len(items))
        # Compiling happens before the first batch of a bucket decodes; it is reported apart from
        # decoding (see _figures for what each figure holds).
        decode_seconds = max(seconds - compile_seconds, 0.0)
        load_seconds = model.load_seconds if loaded_now else 0.0
        yield beam.pvalue.TaggedOutput(STATS, {
            "batches": 1, "rows": len(done), "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "tau_histogram": hist, "decode_seconds": decode_seconds, "compile_seconds": compile_seconds,
            "load_seconds": load_seconds, "model_loads": int(loaded_now),
            "bucket": bucket,
            "bucket_figures": {"rows": len(done), "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                               "decode_seconds": decode_seconds, "compile_seconds": compile_seconds,
                               "batched_rows": len(items),
                               "batched_prompt_tokens": sum(len(it.token_ids) for it in items)},
            "worker": self.worker, "hardware": model.hardware,
            "finish_reasons": _count(r.finish_reason for _, r in done),
            "decoder_report": decoder_report,
            # Which attention implementation the decoder's programs were traced with (kernels' self-check).
            "attention": _attention(),
        })


def _attention() -> dict[str, str]:
    """Per attention op, the implementation that decoded: "pallas", "interpret", "reference", or
    "reference (fallback: ...)" after the kernel failed its self-check (see kernels._selfcheck)."""
    from dflash_batch.kernels import attention_report

    return {op: v["impl"] if not v["fallback"] else f"{v['impl']} (fallback: {v['fallback']})"
            for op, v in attention_report().items()}


def _count(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
