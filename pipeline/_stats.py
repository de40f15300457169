"""Per-job statistics: the decode step's per-batch records summed into a run record, then one
``job_stats.json`` for the job.

Each run writes ``OUTPUT/run_stats-<run>.json``: its own figures (see ``_figures``: wall, load,
compile and decode seconds, rows and tokens), per bucket too, and its tau histogram. Then
``job_stats.json``: every field of ``schemas.JOB_STATS_SCHEMA`` (what ``audit`` reads) for the job
as a whole, i.e. summed over every run into this output (a resume is a run of its own), plus
``this_run`` and ``runs`` (each run's figures), the run id, files written, rows skipped by a rerun,
model loads and the automatic block choice.

Both are written by the last step of the pipeline, which waits for every part to be written, so
a ``job_stats.json`` naming a run means that run's files are complete. The job's rows come from
the union of every run's parts, keyed by id (``_outcomes``): completions and dead letters of all
runs, each id once, a dead letter dropped once its id has a completion; rows in are those of
every input file any run read. That step then removes what runs left half-done: parts being
written when a run died, and the ``beam-temp-*`` folders of runs of older versions.

tau is the mean number of tokens committed per target decode step, the bonus token included,
as the DFlash paper counts it (so plain autoregressive decoding has tau = 1).
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import time
from typing import Any, Iterable

import apache_beam as beam

from dflash_batch.pipeline._decode import drafter_id
from dflash_batch.pipeline._figures import Figures, total
from dflash_batch.pipeline._io import JOB_STATS_FILE, RUN_STATS_PREFIX, delete, join, match_files, \
    parquet_footer, read_json, write_json
from dflash_batch.pipeline._config import JobConfig
from dflash_batch.pipeline._outcomes import Outcomes, read_outcomes
from dflash_batch.pipeline._parts import PARTIAL
from dflash_batch.schemas import add_histograms, tau_from_histogram

TAU_NOTE = "tau = tokens committed per target decode step, bonus token included (the DFlash paper's count)"

_SUMS = ("batches", "rows", "prompt_tokens", "completion_tokens", "decode_seconds", "compile_seconds",
         "load_seconds", "model_loads")
# Per bucket: the figures, plus every row handed to the decoder and its prompt tokens (padding waste).
_BUCKET_SUMS = ("rows", "prompt_tokens", "completion_tokens", "decode_seconds", "compile_seconds", "batched_rows",
                "batched_prompt_tokens")


def job_id(name: str, run_id: str) -> str:
    """The id of one run of a job: the ledger's, job_stats.json's and the report's."""
    return f"{name}-{run_id}"


def _calls(report: dict) -> int:
    return sum(report.get("decode_calls_by_block", {}).values())


def _keep_latest(reports: dict[str, dict], key: str, report: dict) -> None:
    """Decoder reports are cumulative per worker and bucket: the one with the most decode calls is the latest."""
    if report and (key not in reports or _calls(report) >= _calls(reports[key])):
        reports[key] = report


def _add_counts(into: dict, more: dict) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


def _add_attention(into: dict[str, list[str]], more: dict[str, list[str]]) -> None:
    """Per attention op, every implementation that decoded some batch (see _decode._attention)."""
    for op, impls in more.items():
        into[op] = sorted(set(into.get(op, [])) | set(impls))


def kernel_fallbacks(attention: dict[str, list[str]]) -> list[str]:
    """The ops whose kernel failed its self-check and was replaced by the reference, with why."""
    return [f"{op}: {impl}" for op, impls in sorted(attention.items()) for impl in impls if "(fallback:" in impl]


class BatchStatsFn(beam.CombineFn):
    """Sums the decode step's per-batch records into one."""

    def create_accumulator(self) -> dict[str, Any]:
        acc: dict[str, Any] = {k: 0 for k in _SUMS}
        acc.update(tau_histogram=[], buckets={}, workers=[], hardware=[], finish_reasons={}, decoder_reports={},
                   attention={})
        return acc

    def add_input(self, acc: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
        for k in _SUMS:
            acc[k] += rec[k]
        acc["tau_histogram"] = add_histograms(acc["tau_histogram"], rec["tau_histogram"])
        _add_counts(acc["buckets"].setdefault(rec["bucket"], {}), {k: rec["bucket_figures"][k] for k in _BUCKET_SUMS})
        acc["workers"] = sorted(set(acc["workers"]) | {rec["worker"]})
        acc["hardware"] = sorted(set(acc["hardware"]) | {rec["hardware"]})
        _add_counts(acc["finish_reasons"], rec["finish_reasons"])
        _keep_latest(acc["decoder_reports"], f"{rec['worker']} bucket {rec['bucket']}", rec.get("decoder_report"))
        _add_attention(acc["attention"], {op: [impl] for op, impl in (rec.get("attention") or {}).items()})
        return acc

    def merge_accumulators(self, accumulators: Iterable[dict[str, Any]]) -> dict[str, Any]:
        out = self.create_accumulator()
        for acc in accumulators:
            for k in _SUMS:
                out[k] += acc[k]
            out["tau_histogram"] = add_histograms(out["tau_histogram"], acc["tau_histogram"])
            for bucket, sums in acc["buckets"].items():
                _add_counts(out["buckets"].setdefault(bucket, {}), sums)
            out["workers"] = sorted(set(out["workers"]) | set(acc["workers"]))
            out["hardware"] = sorted(set(out["hardware"]) | set(acc["hardware"]))
            _add_counts(out["finish_reasons"], acc["finish_reasons"])
            for key, report in acc["decoder_reports"].items():
                _keep_latest(out["decoder_reports"], key, report)
            _add_attention(out["attention"], acc.get("attention") or {})
        return out

    def extract_output(self, acc: dict[str, Any]) -> dict[str, Any]:
        return acc


def padding_waste(buckets: dict[str, dict[str, int]]) -> dict[str, float]:
    """Per bucket, the fraction of padded prompt positions (rows x bucket) that held padding."""
    out = {}
    for b, s in sorted(buckets.items(), key=lambda kv: int(kv[0])):
        if s.get("batched_rows"):
            out[str(b)] = round(1.0 - s["batched_prompt_tokens"] / (s["batched_rows"] * int(b)), 4)
    return out


def _bucket_record(sums: dict[str, Any]) -> dict[str, Any]:
    figures = Figures(**{k: sums.get(k, 0) for k in ("rows", "prompt_tokens", "completion_tokens", "decode_seconds",
                                                      "compile_seconds")})
    return {**figures.as_dict(), "batched_rows": sums.get("batched_rows", 0),
            "batched_prompt_tokens": sums.get("batched_prompt_tokens", 0)}


def run_record(config: JobConfig, run_id: str, started: float, finished: float, sums: dict[str, Any],
               dead_letters: int, skipped: int, inputs: dict[str, int] | None = None) -> dict[str, Any]:
    """What one run did (``run_stats-<run>.json``): its figures, per bucket too, its tau histogram,
    and the automatic block choice per worker and bucket."""
    figures = Figures(wall_seconds=finished - started, **{k: sums[k] for k in _SUMS if k != "batches"})
    return {
        "run_id": run_id, "job_id": job_id(config.spec.name, run_id),
        "started_at": _iso(started), "finished_at": _iso(finished),
        **figures.as_dict(),
        "batches": sums["batches"], "skipped_completed": skipped, "dead_letters": dead_letters,
        "inputs": dict(inputs or {}),  # each input file this run read, with its rows
        "tau_histogram": list(sums["tau_histogram"]),
        "buckets": {str(b): _bucket_record(s) for b, s in sorted(sums["buckets"].items())},
        "hardware": sums["hardware"], "workers": sums["workers"], "finish_reasons": sums["finish_reasons"],
        # Per worker and bucket: the block lengths' measured step costs, the acceptance seen, the
        # expected tokens/s of each, and how many decode calls ran at each (and hybrid's source choices).
        "block_choice": dict(sorted(sums["decoder_reports"].items())),
        # Per attention op, the implementations that decoded (a kernel that failed its self-check shows
        # as "reference (fallback: why)"), and those fallbacks alone.
        "attention": sums.get("attention") or {},
        "kernel_fallbacks": kernel_fallbacks(sums.get("attention") or {}),
    }


def job_totals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The job's figures over its runs' records: sums, and rates over the same runs' sums."""
    hist: list[int] = []
    buckets: dict[str, dict[str, Any]] = {}
    finish: dict[str, int] = {}
    hardware: set[str] = set()
    for r in runs:
        hist = add_histograms(hist, r.get("tau_histogram") or [])
        for b, s in (r.get("buckets") or {}).items():
            _add_counts(buckets.setdefault(b, {}), {k: s.get(k, 0) for k in _BUCKET_SUMS})
        _add_counts(finish, r.get("finish_reasons") or {})
        hardware |= set(r.get("hardware") or [])
    tau = tau_from_histogram(hist)
    return {
        "figures": total(Figures.from_dict(r) for r in runs),
        "tau_histogram": hist,
        "tau_mean": None if tau is None else round(tau, 4),
        "decode_steps": sum(hist),
        "buckets": {b: _bucket_record(s) for b, s in sorted(buckets.items(), key=lambda kv: int(kv[0]))},
        "padding_waste": padding_waste(buckets),
        "finish_reasons": finish,
        "hardware": "; ".join(sorted(hardware)) or None,
    }


def job_rows_in(runs: list[dict[str, Any]]) -> int:
    """Rows in the union of the input files the runs read (a file read by two runs counts once)."""
    files: dict[str, int] = {}
    for r in runs:
        files.update(r.get("inputs") or {})
    return sum(files.values())


def job_stats_record(config: JobConfig, run: dict[str, Any], earlier_runs: list[dict[str, Any]],
                     outcomes: Outcomes) -> dict:
    """The job-stats record of the job after ``run``: JOB_STATS_SCHEMA's fields first (the job's
    figures, over every run into this output; its rows from the union of their parts), then the extras."""
    runs = sorted([*earlier_runs, run], key=lambda r: r["run_id"])
    t = job_totals(runs)
    fig: Figures = t["figures"]
    spec = config.spec
    block = 1 if spec.decode.mode == "ar" else spec.decode.block_size  # "auto": chosen per batch by the decoder
    return {
        "job_id": run["job_id"],
        "spec_json": spec.to_json(),  # the job spec as run, defaults included
        "rows_in": job_rows_in(runs),
        "completions_out": len(outcomes.completed),
        "dead_letters": len(outcomes.dead),
        "prompt_tokens": fig.prompt_tokens,
        "completion_tokens": fig.completion_tokens,
        "wall_seconds": fig.wall_seconds,
        "decode_seconds": fig.decode_seconds,
        "compile_seconds": fig.compile_seconds,
        "tokens_per_s": fig.tokens_per_s,
        "tau_mean": t["tau_mean"],
        "tau_histogram": t["tau_histogram"],
        "padding_waste_json": json.dumps(t["padding_waste"]),
        "mode": spec.decode.mode,
        "block_size": str(block),
        "batch_size": spec.decode.batch_size,
        "hardware": t["hardware"],
        "model": spec.model.target,
        "drafter": drafter_id(config),
        "dtype": config.dtype,  # resolved: what the weights, activations and caches were held in
        # Beyond the schema:
        "run_id": run["run_id"],
        "name": spec.name,
        "output": config.output,
        "started_at": run["started_at"],
        "finished_at": run["finished_at"],
        "dead_letters_by_kind": outcomes.dead_by_kind(),
        "rows_in_this_run": sum((run.get("inputs") or {}).values()),
        "dead_letters_this_run": run["dead_letters"],
        "completions_this_run": run["rows"],
        "skipped_completed": run["skipped_completed"],
        "decode_tokens_per_s": fig.decode_tokens_per_s,
        "load_seconds": fig.load_seconds,
        "model_loads": fig.model_loads,
        "finish_reasons": t["finish_reasons"],
        "buckets": t["buckets"],
        "this_run": run,
        "runs": [{k: v for k, v in r.items() if k not in ("buckets", "tau_histogram", "block_choice", "attention")}
                 for r in runs],
        # The automatic block choice of the latest run that decoded (see run_record).
        "block_choice": next((r["block_choice"] for r in reversed(runs) if r.get("block_choice")), {}),
        "attention": next((r["attention"] for r in reversed(runs) if r.get("attention")), {}),
        "kernel_fallbacks": sorted({f for r in runs for f in r.get("kernel_fallbacks") or []}),
        "tau_note": TAU_NOTE,
        "files": {"completions": list(outcomes.completion_files), "dead_letters": list(outcomes.dead_files)},
    }


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def read_runs(output: str) -> list[dict[str, Any]]:
    """The run records in ``output``, oldest first."""
    runs = [read_json(p) for p in match_files(join(output, f"{RUN_STATS_PREFIX}*.json"))]
    return sorted((r for r in runs if isinstance(r, dict) and r.get("run_id")), key=lambda r: r["run_id"])


def remove_leftovers(output: str) -> list[str]:
    """Deletes what runs that died left behind: half-written parts and older versions' Beam temp
    folders. Returns what was deleted. (Only safe once no other run writes into ``output``.)"""
    gone = match_files(join(output, f"*{PARTIAL}*"))
    if "://" in output:  # an object store has no folders: a temp "folder" is the objects under it
        gone += match_files(join(output, "beam-temp-*/*"))
    else:  # Beam's local listing skips folders; deleting one removes what it holds
        gone += sorted(glob.glob(os.path.join(glob.escape(output), "beam-temp-*")))
    delete(gone)
    return gone


class WriteJobStats(beam.DoFn):
    """The last step: writes ``OUTPUT/run_stats-<run>.json`` and ``OUTPUT/job_stats.json``, then
    removes the leftovers of runs that died."""

    def __init__(self, config: JobConfig, run_id: str, started: float, files: tuple[str, ...]):
        self.config = config
        self.run_id = run_id
        self.started = started
        self.files = files

    def setup(self):
        from dflash_batch.pipeline._io import use_anonymous_gcs_for_emulator

        use_anonymous_gcs_for_emulator()

    def process(self, _unused, sums, rows_in, dead_letters, skipped, dead_files):
        # rows_in and dead_files are side inputs so this step waits for reading and every write.
        earlier = [r for r in read_runs(self.config.output) if r["run_id"] != self.run_id]
        inputs = {path: parquet_footer(path)[1] for path in self.files}
        run = run_record(self.config, self.run_id, self.started, time.time(), sums, dead_letters, skipped, inputs)
        write_json(join(self.config.output, f"{RUN_STATS_PREFIX}{self.run_id}.json"), run)
        record = job_stats_record(self.config, run, earlier, read_outcomes(self.config.output))
        write_json(join(self.config.output, JOB_STATS_FILE), record)
        remove_leftovers(self.config.output)
        yield record
