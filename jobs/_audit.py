"""``dflash-batch audit OUTPUT_OR_JOB [--json] [--html PATH] [--baseline AR_OUTPUT]``: what a job did.

OUTPUT_OR_JOB is the job's output (a local folder or a gs:// prefix, read through Beam's
FileSystems), its job file (the TOML names the output), or the id of one of its runs (as the
ledger, ``job_stats.json`` and the report name it).

Reads ``OUTPUT/completions-*.parquet``, ``dead_letters-*.parquet`` (each id counted once, dead
letters grouped by kind: see ``pipeline.read_outcomes``), the runs' records
``run_stats-*.json`` and ``job_stats.json``. Rows, tokens, tau and the per-bucket counts come
from the completions themselves. Time and throughput are the figures of ``pipeline._figures``,
read from each run's record: per run, and for the job summed over its runs (a resume is a run
of its own), each rate dividing the tokens of the runs it sums by the seconds of those runs. So
``run``'s summary, ``job_stats.json``, this audit and its report show the same numbers.

Per bucket:
- batch fill: rows per decoder call over the rows a call takes (``pipeline.rows_per_batch``,
  0 meaning 4 x batch_size); a decoder call is one distinct ``(worker, batch_index)``;
- padding waste: 1 - prompt tokens / (rows x bucket), the padded prompt positions that held padding;
- tokens/s: the bucket's completion tokens over its decode seconds, from the runs' records.

Block choice (``block_size = "auto"``): per worker and bucket, from ``job_stats.json``: the decode
calls run at each block length L, and each L's expected tokens/s per row (acceptance seen x
measured step cost) that drove the choice; the HTML report plots both.

Speedup over AR: from ``--baseline`` (an AR job's output: the ratio of tokens/s while decoding),
or from a ``bench.json`` in OUTPUT (``dflash-batch bench --json`` rows whose mode and batch size match).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import click

from dflash_batch.jobs._exit import Refused
from dflash_batch.jobs._report import choice_line, format_html
from dflash_batch.jobs._run import reason_lines
from dflash_batch.pipeline import COMPLETIONS_PREFIX, JOB_STATS_FILE, PARQUET_SUFFIX, Figures, job_totals, join, \
    match_files, rate_line, read_json, read_outcomes, read_runs, read_table, time_line
from dflash_batch.schemas import add_histograms, observed_range, tau_from_histogram

REPORT_FILE = "report.html"
BENCH_FILE = "bench.json"


_COLUMNS = ["id", "prompt_tokens", "completion_tokens", "decode_steps", "accepted_per_step", "bucket",
            "batch_index", "worker", "decode_seconds", "finish_reason", "mode"]


def resolve_output(output_or_job: str) -> str:
    """The output location of a job given by its output, its job file, or a run's id in the ledger."""
    if os.path.isfile(output_or_job):
        from dflash_batch.jobs._spec import SpecError, load_spec

        try:
            return os.path.abspath(load_spec(output_or_job).output)
        except SpecError as e:
            raise Refused(f"{output_or_job} is not a job file: {e}") from None
    if "://" in output_or_job or os.path.isdir(output_or_job) or os.sep in output_or_job \
            or output_or_job.startswith("."):
        return output_or_job.rstrip("/")
    from dflash_batch.jobs._ledger import ledger_path, list_jobs

    for row in list_jobs():
        if row["job_id"] == output_or_job and row.get("output"):
            return row["output"].rstrip("/")
    raise Refused(f"{output_or_job}: not a job output folder, a job file, or a job id in the ledger "
                  f"({ledger_path()})")


def _rows_per_call(stats: dict[str, Any]) -> int | None:
    try:
        spec = json.loads(stats.get("spec_json") or "{}")
    except ValueError:
        spec = {}
    per_batch = (spec.get("pipeline") or {}).get("rows_per_batch") or spec.get("rows_per_batch")
    batch = stats.get("batch_size") or (spec.get("decode") or {}).get("batch_size")
    return per_batch or (4 * batch if batch else None)


def _runs(output: str, stats: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs' records; an output written before runs had records has only its job_stats.json."""
    runs = read_runs(output)
    if not runs and stats:
        runs = [{"run_id": stats.get("run_id"), "job_id": stats.get("job_id"), "started_at": stats.get("started_at"),
                 **Figures.from_dict(stats).as_dict(), "tau_histogram": stats.get("tau_histogram") or []}]
    return runs


def audit(output: str, baseline: str | None = None) -> dict[str, Any]:
    """The audit of the job in ``output`` as a JSON-ready dict.

    Algorithm:
      1. Read the completions, each id once, and refuse a folder that is no job output.
      2. Add the rows' accepted-per-step histograms: tau and the step counts come from them.
      3. Sum the runs' records into the job's figures (time, tokens/s, per bucket).
      4. Group the rows into decoder calls per bucket: batch fill and padding waste.
      5. Add the speedup over AR and the automatic block choice, where there are figures for them.
    """
    stats = read_json(join(output, JOB_STATS_FILE)) or {}
    rows = _completions(output, stats)
    outcomes = read_outcomes(output)
    hist: list[int] = []
    for r in rows:
        hist = add_histograms(hist, r.get("accepted_per_step") or [])
    tau = tau_from_histogram(hist)
    runs = _runs(output, stats)
    totals = job_totals(runs)
    job: Figures = totals["figures"]
    buckets = _buckets(rows, _rows_per_call(stats), totals["buckets"])
    modes = sorted({r["mode"] for r in rows if r.get("mode")}) or ([stats["mode"]] if stats.get("mode") else [])
    return {
        "output": output,
        "job_id": stats.get("job_id"),
        "name": stats.get("name"),
        "mode": ",".join(modes) or None,
        "dtype": stats.get("dtype"),  # None: a job from before the dtype was recorded (float32)
        "batch_size": stats.get("batch_size"),
        "block_size": stats.get("block_size"),
        "hardware": totals["hardware"] or stats.get("hardware"),
        "attention": stats.get("attention") or {},  # op -> implementations that decoded
        "kernel_fallbacks": stats.get("kernel_fallbacks") or [],
        "rows_in": stats.get("rows_in"),
        "completions": len(rows),
        "dead_letters": len(outcomes.dead),
        "dead_letters_by_kind": outcomes.dead_by_kind(),
        "dead_letter_examples": outcomes.dead_examples(),
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows),
        "completion_tokens": sum(r["completion_tokens"] or 0 for r in rows),
        # The job's figures over its runs (see pipeline._figures); each run's below.
        "wall_seconds": job.wall_seconds,
        "load_seconds": job.load_seconds,
        "compile_seconds": job.compile_seconds,
        "decode_seconds": job.decode_seconds,
        "tokens_per_s": job.tokens_per_s,
        "decode_tokens_per_s": job.decode_tokens_per_s,
        # Completion tokens the rates cover (those of runs with a record: an interrupted run has none).
        "rate_completion_tokens": job.completion_tokens,
        "runs": [{"run_id": r.get("run_id"), "job_id": r.get("job_id"), "started_at": r.get("started_at"),
                  **Figures.from_dict(r).as_dict()} for r in runs],
        "tau_mean": None if tau is None else round(tau, 4),
        "tau_histogram": hist,
        "decode_steps": sum(hist),
        "finish_reasons": dict(collections.Counter(r["finish_reason"] for r in rows)),
        "buckets": buckets,
        "speedup_over_ar": _speedup(output, stats, job.decode_tokens_per_s, baseline),
        "block_choice": _block_choice(stats),
    }


def _completions(output: str, stats: dict[str, Any]) -> list[dict[str, Any]]:
    """The completion rows in ``output``, one per id: a retried bundle may have saved an id twice."""
    files = match_files(join(output, f"{COMPLETIONS_PREFIX}*{PARQUET_SUFFIX}"))
    if not files and not stats:
        raise Refused(f"{output}: no {COMPLETIONS_PREFIX}*{PARQUET_SUFFIX} and no {JOB_STATS_FILE} there "
                      "(not a job output)")
    by_id: dict[str, dict[str, Any]] = {}
    for path in files:
        for row in read_table(path, _COLUMNS).to_pylist():
            by_id.setdefault(row["id"], row)
    return list(by_id.values())


def _buckets(rows: list[dict[str, Any]], per_call: int | None,
             recorded: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per bucket, in bucket order: rows, decoder calls, tokens, batch fill, padding waste, and the
    decode seconds and tokens/s of the runs' records (``recorded``, keyed by the bucket as text).

    A decoder call is one distinct ``(worker, batch_index)`` within a bucket.
    """
    buckets: dict[int, dict[str, Any]] = {}
    calls: dict[tuple[int, str, int], list[dict[str, Any]]] = collections.defaultdict(list)
    for r in rows:
        calls[(r["bucket"], r["worker"], r["batch_index"])].append(r)
    for (bucket, _, _), members in sorted(calls.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2])):
        b = buckets.setdefault(bucket, {"bucket": bucket, "rows": 0, "calls": 0, "prompt_tokens": 0,
                                        "completion_tokens": 0})
        b["rows"] += len(members)
        b["calls"] += 1
        b["prompt_tokens"] += sum(m["prompt_tokens"] or 0 for m in members)
        b["completion_tokens"] += sum(m["completion_tokens"] or 0 for m in members)
    for b in buckets.values():
        figures = Figures.from_dict(recorded.get(str(b["bucket"])) or {})
        b["padding_waste"] = round(1.0 - b["prompt_tokens"] / (b["rows"] * b["bucket"]), 4)
        b["batch_fill"] = round(b["rows"] / (b["calls"] * per_call), 4) if per_call else None
        b["decode_seconds"] = figures.decode_seconds
        b["tokens_per_s"] = figures.decode_tokens_per_s
    return [buckets[k] for k in sorted(buckets)]


def _block_choice(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Per worker and bucket of an automatic block choice: calls per L and why (expected tokens/s)."""
    out = []
    for where, r in sorted((stats.get("block_choice") or {}).items()):
        calls = {int(k): int(v) for k, v in (r.get("decode_calls_by_block") or {}).items()}
        if len(r.get("candidates") or []) < 2 or not calls:
            continue  # a fixed block length: nothing was chosen
        expected = {int(k): float(v) for k, v in (r.get("expected_tokens_per_s_per_row") or {}).items()}
        gated = {int(k): float(v) for k, v in (r.get("gated_fraction_by_block") or {}).items()}
        out.append({"where": where, "calls_by_block": calls, "gated_fraction_by_block": gated,
                    "expected_tokens_per_s_per_row": expected,
                    "most_run": max(calls, key=lambda b: (calls[b], -b)),
                    "best_expected": max(expected, key=expected.get) if expected else None})
    return out


def _speedup(output: str, stats: dict[str, Any], decode_tps: float | None, baseline: str | None):
    if baseline:
        base = audit(resolve_output(baseline))
        if base["mode"] != "ar":
            raise Refused(f"--baseline {baseline} is a {base['mode']} job, not ar")
        if decode_tps and base["decode_tokens_per_s"]:
            return {"source": f"baseline {baseline}", "ar_dtype": base["dtype"],
                    "ar_tokens_per_s": base["decode_tokens_per_s"],
                    "tokens_per_s": decode_tps, "speedup": round(decode_tps / base["decode_tokens_per_s"], 3)}
    bench = read_json(join(output, BENCH_FILE))
    if isinstance(bench, list):
        for row in bench:
            if row.get("mode") == stats.get("mode") and row.get("batch_size") == stats.get("batch_size") \
                    and row.get("dtype", stats.get("dtype")) == stats.get("dtype") and row.get("speedup") is not None:
                return {"source": join(output, BENCH_FILE), "ar_tokens_per_s": row.get("ar_tokens_per_s"),
                        "tokens_per_s": row.get("tokens_per_s"), "speedup": row["speedup"],
                        "block_size": row.get("block_size")}
    return None


# ---- text ---------------------------------------------------------------------------------------

def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_text(a: dict[str, Any]) -> str:
    runs = a["runs"]
    job = Figures.from_dict(a)
    lines = [
        f"job {a['name'] or '-'} ({a['job_id'] or 'no job_stats.json'}) in {a['output']}",
        f"  mode {a['mode']}, dtype {a['dtype'] or '-'}, batch {a['batch_size']}, block {a['block_size']}, "
        f"on {a['hardware'] or '-'}",
        *(["  attention: " + "; ".join(f"{op.removesuffix('_attention')} {', '.join(impls)}"
                                       for op, impls in sorted(a["attention"].items()))] if a["attention"] else []),
        *[f"  WARNING kernel fallback: {f}" for f in a["kernel_fallbacks"]],
        f"  rows: {a['rows_in']} in, {a['completions']} completions, {a['dead_letters']} dead letters",
        f"  tokens: {a['prompt_tokens']} prompt, {a['completion_tokens']} completion",
    ]
    indent = "  "
    if len(runs) > 1:
        lines.append(f"  runs ({len(runs)}; a resume is a run of its own):")
        for r in runs:
            f = Figures.from_dict(r)
            lines += [f"    {r['job_id']}:", f"      time: {time_line(f)}", f"      tokens/s: {rate_line(f)}"]
        lines.append(f"  job, over its {len(runs)} runs:")
        indent = "    "
    lines += [f"{indent}time: {time_line(job)}", f"{indent}tokens/s: {rate_line(job)}"]
    if a["rate_completion_tokens"] != a["completion_tokens"]:
        lines.append(f"  ({a['completion_tokens'] - a['rate_completion_tokens']} completion tokens come from runs "
                     "without a record, e.g. interrupted ones, and are not in these rates)")
    lines += [
        f"  tau: mean {_f(a['tau_mean'])} over {a['decode_steps']} steps; histogram (steps committing 1, 2, ... "
        f"tokens): {observed_range(a['tau_histogram'])}",
        "  bucket   rows  calls  fill   padding  tokens/s",
    ]
    for b in a["buckets"]:
        lines.append(f"  {b['bucket']:>6} {b['rows']:>6} {b['calls']:>6}  {_f(b['batch_fill'], '{:.0%}'):>5}  "
                     f"{b['padding_waste']:>7.0%}  {_f(b['tokens_per_s'], '{:.1f}'):>8}")
    if a["speedup_over_ar"]:
        s = a["speedup_over_ar"]
        lines.append(f"  speedup over AR: {s['speedup']:.2f}x ({s['source']})")
    for c in a["block_choice"]:
        lines.append(f"  block choice, {choice_line(c)}")
    lines += [f"  {line}" for line in reason_lines(a["dead_letters_by_kind"], a["dead_letter_examples"])]
    return "\n".join(lines)


def _write_text(path: str, text: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    if "://" not in path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with FileSystems.create(path, mime_type="text/html", compression_type="uncompressed") as f:
        f.write(text.encode("utf-8"))


@click.command("audit")
@click.argument("output_or_job")
@click.option("--json", "as_json", is_flag=True, help="Print the audit as JSON.")
@click.option("--html", "html_path", default=None, help=f"Where to write the HTML report (default OUTPUT/{REPORT_FILE}).")
@click.option("--baseline", default=None, help="An AR job's output (or job file, or run id), for the speedup over AR.")
def audit_command(output_or_job: str, as_json: bool, html_path: str | None, baseline: str | None) -> None:
    """Throughput, tau, batch fill and padding of a job: OUTPUT_OR_JOB is its output (folder or
    gs://), its job file, or a run's id."""
    from dflash_batch.pipeline import use_anonymous_gcs_for_emulator

    use_anonymous_gcs_for_emulator()
    output = resolve_output(output_or_job)
    report = audit(output, baseline)
    html_path = html_path or join(output, REPORT_FILE)
    _write_text(html_path, format_html(report))
    report["report_html"] = html_path
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_text(report))
        click.echo(f"report: {html_path}")
