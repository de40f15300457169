"""Per-job statistics: the decode step's per-batch records summed, then one ``job_stats.json``.

The record has every field of ``schemas.JOB_STATS_SCHEMA`` (what ``audit`` reads) plus a few
more (run id, files written, rows skipped by a rerun, model loads). It is written by the last
step of the pipeline, which waits for both Parquet writes to finish, so a ``job_stats.json``
naming a run means that run's files are complete. That step also deletes dead-letter files of
earlier runs: each run re-derives every dead letter from the whole input.

tau is the mean number of tokens committed per target decode step, the bonus token included,
as the DFlash paper counts it (so plain autoregressive decoding has tau = 1).
"""

from __future__ import annotations

import datetime
import json
import time
from typing import Any, Iterable

import apache_beam as beam
import numpy as np

from dflash_batch.pipeline._decode import drafter_id
from dflash_batch.pipeline._io import DEAD_LETTERS_PREFIX, JOB_STATS_FILE, PARQUET_SUFFIX, delete, join, \
    match_files, write_json
from dflash_batch.pipeline._options import JobConfig

TAU_NOTE = "tau = tokens committed per target decode step, bonus token included (the DFlash paper's count)"

_SUMS = ("batches", "rows", "prompt_tokens", "completion_tokens", "decode_seconds", "compile_seconds",
         "load_seconds", "model_loads")


def _calls(report: dict) -> int:
    return sum(report.get("decode_calls_by_block", {}).values())


def _keep_latest(reports: dict[str, dict], key: str, report: dict) -> None:
    """Decoder reports are cumulative per worker and bucket: the one with the most decode calls is the latest."""
    if report and (key not in reports or _calls(report) >= _calls(reports[key])):
        reports[key] = report


def _add_hist(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    padded = [np.pad(np.asarray(h, np.int64), (0, n - len(h))) for h in (a, b)]
    return (padded[0] + padded[1]).tolist()


class BatchStatsFn(beam.CombineFn):
    """Sums the decode step's per-batch records into one."""

    def create_accumulator(self) -> dict[str, Any]:
        acc: dict[str, Any] = {k: 0 for k in _SUMS}
        acc.update(tau_histogram=[], buckets={}, workers=[], hardware=[], finish_reasons={}, decoder_reports={})
        return acc

    def add_input(self, acc: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
        for k in _SUMS:
            acc[k] += rec[k]
        acc["tau_histogram"] = _add_hist(acc["tau_histogram"], rec["tau_histogram"])
        rows, tokens = acc["buckets"].get(rec["bucket"], (0, 0))
        acc["buckets"][rec["bucket"]] = (rows + rec["bucket_rows"], tokens + rec["bucket_prompt_tokens"])
        acc["workers"] = sorted(set(acc["workers"]) | {rec["worker"]})
        acc["hardware"] = sorted(set(acc["hardware"]) | {rec["hardware"]})
        for reason, n in rec["finish_reasons"].items():
            acc["finish_reasons"][reason] = acc["finish_reasons"].get(reason, 0) + n
        _keep_latest(acc["decoder_reports"], f"{rec['worker']} bucket {rec['bucket']}", rec.get("decoder_report"))
        return acc

    def merge_accumulators(self, accumulators: Iterable[dict[str, Any]]) -> dict[str, Any]:
        out = self.create_accumulator()
        for acc in accumulators:
            for k in _SUMS:
                out[k] += acc[k]
            out["tau_histogram"] = _add_hist(out["tau_histogram"], acc["tau_histogram"])
            for bucket, (rows, tokens) in acc["buckets"].items():
                r0, t0 = out["buckets"].get(bucket, (0, 0))
                out["buckets"][bucket] = (r0 + rows, t0 + tokens)
            out["workers"] = sorted(set(out["workers"]) | set(acc["workers"]))
            out["hardware"] = sorted(set(out["hardware"]) | set(acc["hardware"]))
            for reason, n in acc["finish_reasons"].items():
                out["finish_reasons"][reason] = out["finish_reasons"].get(reason, 0) + n
            for key, report in acc["decoder_reports"].items():
                _keep_latest(out["decoder_reports"], key, report)
        return out

    def extract_output(self, acc: dict[str, Any]) -> dict[str, Any]:
        return acc


def padding_waste(buckets: dict[int, tuple[int, int]]) -> dict[str, float]:
    """Per bucket, the fraction of padded prompt positions (rows x bucket) that held padding."""
    return {str(b): round(1.0 - tokens / (rows * b), 4) for b, (rows, tokens) in sorted(buckets.items()) if rows}


def job_stats_record(config: JobConfig, run_id: str, started: float, sums: dict[str, Any], rows_in: int,
                     dead_letters: int, skipped: int, completion_files: list[str], dead_files: list[str]) -> dict:
    """The job-stats record (JOB_STATS_SCHEMA's fields first, then the extras)."""
    wall = time.time() - started
    hist = np.asarray(sums["tau_histogram"], np.int64)
    steps = int(hist.sum())
    committed = int((hist * np.arange(1, len(hist) + 1)).sum())
    block = 1 if config.mode == "ar" else config.block_size  # "auto": chosen per batch by the decoder
    return {
        "job_id": f"{config.name}-{run_id}",
        # The job spec as run; a job launched with flags alone records its flags' values instead.
        "spec_json": config.spec_json if config.spec_json not in ("", "{}") else config.to_json(),
        "rows_in": rows_in,
        "completions_out": sums["rows"] + skipped,
        "dead_letters": dead_letters,
        "prompt_tokens": sums["prompt_tokens"],
        "completion_tokens": sums["completion_tokens"],
        "wall_seconds": round(wall, 3),
        "decode_seconds": round(sums["decode_seconds"], 3),
        "compile_seconds": round(sums["compile_seconds"], 3),
        "tokens_per_s": round(sums["completion_tokens"] / wall, 3) if wall > 0 else None,
        "tau_mean": round(committed / steps, 4) if steps else None,
        "tau_histogram": hist.tolist(),
        "padding_waste_json": json.dumps(padding_waste(sums["buckets"])),
        "mode": config.mode,
        "block_size": str(block),
        "batch_size": config.batch_size,
        "hardware": "; ".join(sums["hardware"]) or None,
        "model": config.model,
        "drafter": drafter_id(config),
        # Beyond the schema:
        "run_id": run_id,
        "name": config.name,
        "output": config.output,
        "started_at": _iso(started),
        "finished_at": _iso(time.time()),
        "completions_this_run": sums["rows"],
        "skipped_completed": skipped,
        "decode_tokens_per_s": round(sums["completion_tokens"] / sums["decode_seconds"], 3)
        if sums["decode_seconds"] else None,
        "load_seconds": round(sums["load_seconds"], 3),
        "model_loads": sums["model_loads"],
        "batches": sums["batches"],
        "workers": sums["workers"],
        "finish_reasons": sums["finish_reasons"],
        # Per worker and bucket: the block lengths' measured step costs, the acceptance seen, the
        # expected tokens/s of each, and how many decode calls ran at each (and hybrid's source choices).
        "block_choice": dict(sorted(sums["decoder_reports"].items())),
        "tau_note": TAU_NOTE,
        "files": {"completions": sorted(completion_files), "dead_letters": sorted(dead_files)},
    }


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


class WriteJobStats(beam.DoFn):
    """The last step: removes earlier runs' dead letters and writes ``OUTPUT/job_stats.json``."""

    def __init__(self, config: JobConfig, run_id: str, started: float):
        self.config = config
        self.run_id = run_id
        self.started = started

    def setup(self):
        from dflash_batch.pipeline._io import use_anonymous_gcs_for_emulator

        use_anonymous_gcs_for_emulator()

    def process(self, _unused, sums, rows_in, dead_letters, skipped, completion_files, dead_files):
        completion_files, dead_files = list(completion_files), list(dead_files)
        stale = [p for p in match_files(join(self.config.output, f"{DEAD_LETTERS_PREFIX}*{PARQUET_SUFFIX}"))
                 if p not in set(dead_files)]
        delete(stale)
        record = job_stats_record(self.config, self.run_id, self.started, sums, rows_in, dead_letters, skipped,
                                  completion_files, dead_files)
        write_json(join(self.config.output, JOB_STATS_FILE), record)
        yield record
