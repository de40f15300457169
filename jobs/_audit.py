"""``dflash-batch audit OUTPUT_OR_JOB [--json] [--html PATH] [--baseline AR_OUTPUT]``: what a job did.

Reads ``OUTPUT/completions-*.parquet``, ``dead_letters-*.parquet`` and ``job_stats.json`` (a local
folder or a gs:// prefix, through Beam's FileSystems; a ledger job id stands for its output) and
reports per-job throughput. Token counts, tau and the per-bucket figures are recomputed from the
completions themselves, so they cover every run that wrote into OUTPUT; wall and compile time
come from ``job_stats.json`` (the last run).

Per bucket:
- batch fill: rows per decoder call over the rows a call takes (``pipeline.rows_per_batch``,
  0 meaning 4 x batch_size); a decoder call is one distinct ``(worker, batch_index)``;
- padding waste: 1 - prompt tokens / (rows x bucket), the padded prompt positions that held padding;
- tokens/s: completion tokens over the bucket's decoder time, a call's time being the largest
  ``decode_seconds`` of its rows.

Block choice (``block_size = "auto"``): per worker and bucket, from ``job_stats.json``: the decode
calls run at each block length L, and each L's expected tokens/s per row (acceptance seen x
measured step cost) that drove the choice; the HTML report plots both.

Speedup over AR: from ``--baseline`` (an AR job's output: ratio of decode tokens/s), or from a
``bench.json`` in OUTPUT (``dflash-batch bench --json`` rows whose mode and batch size match).
"""

from __future__ import annotations

import base64
import collections
import html
import io
import json
from typing import Any

import click
import numpy as np

from dflash_batch.pipeline._io import COMPLETIONS_PREFIX, DEAD_LETTERS_PREFIX, JOB_STATS_FILE, PARQUET_SUFFIX, \
    join, match_files, read_json

REPORT_FILE = "report.html"
BENCH_FILE = "bench.json"


def _read_table(path: str, columns: list[str] | None = None):
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type="uncompressed") as f:
        return pq.read_table(io.BytesIO(f.read()), columns=columns)


_COLUMNS = ["id", "prompt_tokens", "completion_tokens", "decode_steps", "accepted_per_step", "bucket",
            "batch_index", "worker", "decode_seconds", "finish_reason", "mode"]


def resolve_output(output_or_job: str) -> str:
    """An output location, or the output a ledger job id recorded."""
    if "://" in output_or_job or "/" in output_or_job or output_or_job.startswith("."):
        return output_or_job.rstrip("/")
    from dflash_batch.jobs._ledger import list_jobs

    for row in list_jobs():
        if row["job_id"] == output_or_job and row.get("output"):
            return row["output"].rstrip("/")
    return output_or_job.rstrip("/")


def _rows_per_call(stats: dict[str, Any]) -> int | None:
    try:
        spec = json.loads(stats.get("spec_json") or "{}")
    except ValueError:
        spec = {}
    per_batch = (spec.get("pipeline") or {}).get("rows_per_batch") or spec.get("rows_per_batch")
    batch = stats.get("batch_size") or (spec.get("decode") or {}).get("batch_size")
    return per_batch or (4 * batch if batch else None)


def audit(output: str, baseline: str | None = None) -> dict[str, Any]:
    """The audit of the job in ``output`` as a JSON-ready dict."""
    stats = read_json(join(output, JOB_STATS_FILE)) or {}
    files = match_files(join(output, f"{COMPLETIONS_PREFIX}*{PARQUET_SUFFIX}"))
    if not files and not stats:
        raise click.ClickException(f"{output}: no {COMPLETIONS_PREFIX}*{PARQUET_SUFFIX} and no {JOB_STATS_FILE} "
                                   "there (not a job output)")
    rows: list[dict[str, Any]] = []
    for path in files:
        table = _read_table(path)
        rows.extend(table.select([c for c in _COLUMNS if c in table.column_names]).to_pylist())
    dead_files = match_files(join(output, f"{DEAD_LETTERS_PREFIX}*{PARQUET_SUFFIX}"))
    dead = sum(_read_table(p, ["id"]).num_rows for p in dead_files)
    dead_reasons: collections.Counter[str] = collections.Counter()
    for p in dead_files:
        dead_reasons.update(_read_table(p, ["error"]).column("error").to_pylist())

    hist = np.zeros(0, np.int64)
    for r in rows:
        h = np.asarray(r.get("accepted_per_step") or [], np.int64)
        if len(h) > len(hist):
            hist = np.pad(hist, (0, len(h) - len(hist)))
        hist[: len(h)] += h
    steps = int(hist.sum())
    committed = int((hist * np.arange(1, len(hist) + 1)).sum())
    prompt_tokens = sum(r["prompt_tokens"] or 0 for r in rows)
    completion_tokens = sum(r["completion_tokens"] or 0 for r in rows)

    per_call = _rows_per_call(stats)
    buckets: dict[int, dict[str, Any]] = {}
    calls: dict[tuple[int, str, int], list[dict[str, Any]]] = collections.defaultdict(list)
    for r in rows:
        calls[(r["bucket"], r["worker"], r["batch_index"])].append(r)
    for (bucket, _, _), members in sorted(calls.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2])):
        b = buckets.setdefault(bucket, {"bucket": bucket, "rows": 0, "calls": 0, "prompt_tokens": 0,
                                        "completion_tokens": 0, "decode_seconds": 0.0})
        b["rows"] += len(members)
        b["calls"] += 1
        b["prompt_tokens"] += sum(m["prompt_tokens"] or 0 for m in members)
        b["completion_tokens"] += sum(m["completion_tokens"] or 0 for m in members)
        b["decode_seconds"] += max(m["decode_seconds"] or 0.0 for m in members)
    for b in buckets.values():
        b["padding_waste"] = round(1.0 - b["prompt_tokens"] / (b["rows"] * b["bucket"]), 4)
        b["batch_fill"] = round(b["rows"] / (b["calls"] * per_call), 4) if per_call else None
        b["tokens_per_s"] = round(b["completion_tokens"] / b["decode_seconds"], 3) if b["decode_seconds"] else None
        b["decode_seconds"] = round(b["decode_seconds"], 4)

    wall = stats.get("wall_seconds")
    decode_seconds = sum(b["decode_seconds"] for b in buckets.values())
    decode_tps = round(completion_tokens / decode_seconds, 3) if decode_seconds else None
    modes = sorted({r["mode"] for r in rows if r.get("mode")}) or ([stats["mode"]] if stats.get("mode") else [])
    report = {
        "output": output,
        "job_id": stats.get("job_id"),
        "name": stats.get("name"),
        "mode": ",".join(modes) or None,
        "batch_size": stats.get("batch_size"),
        "block_size": stats.get("block_size"),
        "hardware": stats.get("hardware"),
        "rows_in": stats.get("rows_in"),
        "completions": len(rows),
        "dead_letters": dead,
        "dead_letter_reasons": dict(dead_reasons.most_common()),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "wall_seconds": wall,
        "compile_seconds": stats.get("compile_seconds"),
        "decode_seconds": round(decode_seconds, 4),
        "tokens_per_s": round(completion_tokens / wall, 3) if wall else None,
        "decode_tokens_per_s": decode_tps,
        "tau_mean": round(committed / steps, 4) if steps else None,
        "tau_histogram": hist.tolist(),
        "decode_steps": steps,
        "finish_reasons": dict(collections.Counter(r["finish_reason"] for r in rows)),
        "buckets": [buckets[k] for k in sorted(buckets)],
        "speedup_over_ar": _speedup(output, stats, decode_tps, baseline),
        "block_choice": _block_choice(stats),
    }
    return report


def _block_choice(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Per worker and bucket of an automatic block choice: calls per L and why (expected tokens/s)."""
    out = []
    for where, r in sorted((stats.get("block_choice") or {}).items()):
        calls = {int(k): int(v) for k, v in (r.get("decode_calls_by_block") or {}).items()}
        if len(r.get("candidates") or []) < 2 or not calls:
            continue  # a fixed block length: nothing was chosen
        expected = {int(k): float(v) for k, v in (r.get("expected_tokens_per_s_per_row") or {}).items()}
        drain = {int(k): int(v) for k, v in (r.get("drain_calls_by_block") or {}).items()}
        gated = {int(k): float(v) for k, v in (r.get("gated_fraction_by_block") or {}).items()}
        out.append({"where": where, "calls_by_block": calls, "drain_calls_by_block": drain,
                    "gated_fraction_by_block": gated,
                    "expected_tokens_per_s_per_row": expected,
                    "most_run": max(calls, key=lambda b: (calls[b], -b)),
                    "best_expected": max(expected, key=expected.get) if expected else None,
                    **({"drafter_context_prefills": r["drafter_context_prefills"]}
                       if r.get("drafter_context_prefills") else {})})
    return out


def _speedup(output: str, stats: dict[str, Any], decode_tps: float | None, baseline: str | None):
    if baseline:
        base = audit(baseline)
        if base["mode"] != "ar":
            raise click.ClickException(f"--baseline {baseline} is a {base['mode']} job, not ar")
        if decode_tps and base["decode_tokens_per_s"]:
            return {"source": f"baseline {baseline}", "ar_tokens_per_s": base["decode_tokens_per_s"],
                    "speedup": round(decode_tps / base["decode_tokens_per_s"], 3)}
    bench = read_json(join(output, BENCH_FILE))
    if isinstance(bench, list):
        for row in bench:
            if row.get("mode") == stats.get("mode") and row.get("batch_size") == stats.get("batch_size") \
                    and row.get("speedup") is not None:
                return {"source": join(output, BENCH_FILE), "ar_tokens_per_s": row.get("ar_tokens_per_s"),
                        "speedup": row["speedup"], "block_size": row.get("block_size")}
    return None


# ---- text and HTML ------------------------------------------------------------------------------

def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_text(a: dict[str, Any]) -> str:
    lines = [
        f"job {a['name'] or '-'} ({a['job_id'] or 'no job_stats.json'}) in {a['output']}",
        f"  mode {a['mode']}, batch {a['batch_size']}, block {a['block_size']}, on {a['hardware']}",
        f"  rows: {a['rows_in']} in, {a['completions']} completions, {a['dead_letters']} dead letters",
        f"  tokens: {a['prompt_tokens']} prompt, {a['completion_tokens']} completion",
        f"  time: wall {_f(a['wall_seconds'])} s, compile {_f(a['compile_seconds'])} s, decode "
        f"{_f(a['decode_seconds'])} s",
        f"  tokens/s: {_f(a['tokens_per_s'], '{:.1f}')} over wall time, {_f(a['decode_tokens_per_s'], '{:.1f}')} "
        "while decoding",
        f"  tau: mean {_f(a['tau_mean'])} over {a['decode_steps']} steps; histogram (steps committing 1, 2, ... "
        f"tokens): {a['tau_histogram']}",
        "  bucket   rows  calls  fill   padding  tokens/s",
    ]
    for b in a["buckets"]:
        lines.append(f"  {b['bucket']:>6} {b['rows']:>6} {b['calls']:>6}  {_f(b['batch_fill'], '{:.0%}'):>5}  "
                     f"{b['padding_waste']:>7.0%}  {_f(b['tokens_per_s'], '{:.1f}'):>8}")
    if a["speedup_over_ar"]:
        s = a["speedup_over_ar"]
        lines.append(f"  speedup over AR: {s['speedup']:.2f}x ({s['source']})")
    for c in a["block_choice"]:
        lines.append(f"  block choice, {_choice_line(c)}")
    for reason, n in list(a["dead_letter_reasons"].items())[:5]:
        lines.append(f"  dead letter x{n}: {reason}")
    return "\n".join(lines)


def _choice_line(c: dict[str, Any]) -> str:
    """'WHERE: decode calls L=1 x5, L=2 x1 (draining L=1 x2); steps run as AR by the gate: L=2 30%;
    best expected L=1 at 9.6 tokens/s per row; prompts fed to the drafter: 3 of 8'."""
    calls = ", ".join(f"L={b} x{n}" for b, n in sorted(c["calls_by_block"].items()))
    if c.get("drain_calls_by_block"):
        drained = ", ".join(f"L={b} x{n}" for b, n in sorted(c["drain_calls_by_block"].items()))
        calls += f" (draining {drained})"
    if c.get("gated_fraction_by_block"):
        calls += "; steps run as AR by the gate: " + ", ".join(
            f"L={b} {g:.0%}" for b, g in sorted(c["gated_fraction_by_block"].items()))
    best = c["best_expected"]
    why = (f"; best expected L={best} at {c['expected_tokens_per_s_per_row'][best]:.1f} tokens/s per row"
           if best is not None else "")
    fed = c.get("drafter_context_prefills")
    if fed:  # prompts prefilled while AR ruled skip the drafter's upkeep
        why += f"; prompts fed to the drafter: {fed['fed']} of {fed['fed'] + fed['skipped']}"
    return f"{c['where']}: decode calls {calls}{why}"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plots(a: dict[str, Any]) -> dict[str, str]:
    """Base64 PNGs: tau histogram, tokens/s per bucket, padding waste per bucket, and the
    automatic block choice when there was one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    labels = [str(b["bucket"]) for b in a["buckets"]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    hist = a["tau_histogram"]
    ax.bar(range(1, len(hist) + 1), hist, color="#4472c4")
    ax.set_xticks(range(1, len(hist) + 1))
    ax.set(title=f"Tokens committed per decode step (tau mean {_f(a['tau_mean'])})", xlabel="tokens per step",
           ylabel="steps")
    out["tau_histogram"] = _png(fig)
    plt.close(fig)
    for key, title, ylabel, color in (("tokens_per_s", "Completion tokens/s per bucket", "tokens/s", "#70ad47"),
                                      ("padding_waste", "Padding waste per bucket", "fraction padded", "#ed7d31")):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar(labels, [b[key] or 0 for b in a["buckets"]], color=color)
        ax.set(title=title, xlabel="prompt bucket (padded length)", ylabel=ylabel)
        if key == "padding_waste":
            ax.set_ylim(0, 1)
        out[key] = _png(fig)
        plt.close(fig)
    if a["block_choice"]:
        out["block_choice"] = _block_choice_png(plt, a["block_choice"])
    return out


def _block_choice_png(plt, choices: list[dict[str, Any]]) -> str:
    """Expected tokens/s per row for each block length, one bar group per worker bucket, each bar
    labelled with the decode calls run at that length."""
    blocks = sorted({b for c in choices for b in c["expected_tokens_per_s_per_row"]} |
                    {b for c in choices for b in c["calls_by_block"]})
    shown = choices[:8]
    width = 0.8 / len(shown)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for i, c in enumerate(shown):
        xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(blocks))]
        ys = [c["expected_tokens_per_s_per_row"].get(b, 0.0) for b in blocks]
        bars = ax.bar(xs, ys, width, label=c["where"])
        ax.bar_label(bars, labels=[f"{c['calls_by_block'].get(b, 0)}" for b in blocks], fontsize=7)
    ax.set_xticks(range(len(blocks)), [f"L={b}" if b > 1 else "AR" for b in blocks])
    ax.set(title="Automatic block length: expected tokens/s per row\n(number on a bar: decode calls run at it)",
           xlabel="verified block length", ylabel="tokens/s per row")
    if len(shown) > 1:
        ax.legend(fontsize=7)
    png = _png(fig)
    plt.close(fig)
    return png


def format_html(a: dict[str, Any]) -> str:
    images = plots(a)
    esc = html.escape
    summary = [("rows in", a["rows_in"]), ("completions", a["completions"]), ("dead letters", a["dead_letters"]),
               ("prompt tokens", a["prompt_tokens"]), ("completion tokens", a["completion_tokens"]),
               ("wall seconds", _f(a["wall_seconds"])), ("compile seconds", _f(a["compile_seconds"])),
               ("tokens/s (wall)", _f(a["tokens_per_s"], "{:.1f}")),
               ("tokens/s (decoding)", _f(a["decode_tokens_per_s"], "{:.1f}")), ("tau mean", _f(a["tau_mean"])),
               ("speedup over AR", _f((a["speedup_over_ar"] or {}).get("speedup"), "{:.2f}x"))]
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in summary)
    bucket_rows = "".join(
        f"<tr><td>{b['bucket']}</td><td>{b['rows']}</td><td>{b['calls']}</td><td>{_f(b['batch_fill'], '{:.0%}')}</td>"
        f"<td>{b['padding_waste']:.0%}</td><td>{_f(b['tokens_per_s'], '{:.1f}')}</td></tr>" for b in a["buckets"])
    imgs = "".join(f'<figure><img alt="{k}" src="data:image/png;base64,{v}"><figcaption>{esc(k)}</figcaption>'
                   "</figure>" for k, v in images.items())
    dead = "".join(f"<li>{n} x {esc(r)}</li>" for r, n in a["dead_letter_reasons"].items())
    choice = "".join(f"<li>{esc(_choice_line(c))}</li>" for c in a["block_choice"])
    choice_html = f"<h2>Automatic block length</h2><ul>{choice}</ul>" if choice else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>dflash-batch audit: {esc(str(a['name']))}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}th{{text-align:left}}
figure{{display:inline-block;margin:0 1em 1em 0}}</style></head><body>
<h1>Job {esc(str(a['name']))}</h1>
<p>{esc(str(a['job_id']))}: mode {esc(str(a['mode']))}, batch {a['batch_size']}, block {esc(str(a['block_size']))},
hardware {esc(str(a['hardware']))}. Output: {esc(a['output'])}</p>
<table>{rows}</table>
<h2>Buckets</h2>
<table><tr><th>bucket</th><th>rows</th><th>decoder calls</th><th>batch fill</th><th>padding waste</th>
<th>tokens/s</th></tr>{bucket_rows}</table>
{choice_html}
<h2>Plots</h2>{imgs}
<h2>Dead letters</h2><ul>{dead or '<li>none</li>'}</ul>
<p><small>tau = tokens committed per target decode step, bonus token included.</small></p>
</body></html>"""


def _write_text(path: str, text: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    if "://" not in path:
        import os

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with FileSystems.create(path, mime_type="text/html", compression_type="uncompressed") as f:
        f.write(text.encode("utf-8"))


@click.command("audit")
@click.argument("output_or_job")
@click.option("--json", "as_json", is_flag=True, help="Print the audit as JSON.")
@click.option("--html", "html_path", default=None, help=f"Where to write the HTML report (default OUTPUT/{REPORT_FILE}).")
@click.option("--baseline", default=None, help="An AR job's output, for the speedup over AR.")
def audit_command(output_or_job: str, as_json: bool, html_path: str | None, baseline: str | None) -> None:
    """Throughput, tau, batch fill and padding of the job in OUTPUT_OR_JOB (folder, gs:// or ledger id)."""
    from dflash_batch.pipeline._io import use_anonymous_gcs_for_emulator

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
