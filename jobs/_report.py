"""The HTML report ``audit`` writes (``OUTPUT/report.html``): the audit's figures and its plots.

Only plots that carry information are drawn:
- tokens committed per decode step (tau), over the step sizes that occurred;
- tokens/s and padding waste per bucket, when the job used more than one bucket (one bucket's
  numbers are in the table already);
- the speedup over AR, when there is an AR figure to compare with (``--baseline`` or a
  ``bench.json``); otherwise the report says how to get one;
- the automatic block choice, when there was one.

Each image is embedded as a PNG with a caption in words; ``data-plot`` names it for tools.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from dflash_batch.pipeline import Figures, format_rate, format_seconds
from dflash_batch.schemas import observed_range

CAPTIONS = {
    "tau_histogram": "How many tokens each decode step committed (tau counts the bonus token)",
    "tokens_per_s": "Completion tokens per second while decoding, by prompt bucket",
    "padding_waste": "Share of padded prompt positions that held padding, by prompt bucket",
    "speedup": "Tokens per second while decoding: this job against plain autoregressive decoding",
    "block_choice": "Automatic block length: expected tokens/s per row of each length, and decode calls run at it",
}


def choice_line(c: dict[str, Any]) -> str:
    """'WHERE: decode calls L=1 x5, L=2 x1; steps run as AR by the gate: L=2 30%; best expected
    L=1 at 9.6 tokens/s per row'."""
    calls = ", ".join(f"L={b} x{n}" for b, n in sorted(c["calls_by_block"].items()))
    if c.get("gated_fraction_by_block"):
        calls += "; steps run as AR by the gate: " + ", ".join(
            f"L={b} {g:.0%}" for b, g in sorted(c["gated_fraction_by_block"].items()))
    best = c["best_expected"]
    why = (f"; best expected L={best} at {c['expected_tokens_per_s_per_row'][best]:.1f} tokens/s per row"
           if best is not None else "")
    return f"{c['where']}: decode calls {calls}{why}"


def baseline_hint(a: dict[str, Any]) -> str:
    """How to get a speedup over AR for this job when there is none (HTML)."""
    run = "dflash-batch run JOB.toml --set decode.mode=ar --set output=OUTPUT-ar"
    audit = f"dflash-batch audit {a['output']} --baseline OUTPUT-ar"
    return ("No speedup over AR: there is no AR baseline to compare with. Run the same job with plain "
            f"autoregressive decoding into another output (<code>{html.escape(run)}</code>), then "
            f"<code>{html.escape(audit)}</code>.")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plots(a: dict[str, Any]) -> dict[str, str]:
    """Base64 PNGs by plot id (see CAPTIONS), only those that carry information."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    hist = observed_range(a["tau_histogram"])
    if hist:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar(range(1, len(hist) + 1), hist, color="#4472c4")
        ax.set_xticks(range(1, len(hist) + 1))
        tau = "-" if a["tau_mean"] is None else f"{a['tau_mean']:.2f}"
        ax.set(title=f"Tokens committed per decode step (tau mean {tau})", xlabel="tokens committed in a step",
               ylabel="decode steps")
        out["tau_histogram"] = _png(fig)
        plt.close(fig)
    if len(a["buckets"]) > 1:
        labels = [str(b["bucket"]) for b in a["buckets"]]
        for key, title, ylabel, color in (("tokens_per_s", "Tokens/s while decoding", "tokens/s", "#70ad47"),
                                          ("padding_waste", "Padding waste", "fraction padded", "#ed7d31")):
            fig, ax = plt.subplots(figsize=(5, 3.2))
            ax.bar(labels, [b[key] or 0 for b in a["buckets"]], color=color)
            ax.set(title=title, xlabel="prompt bucket (padded length, tokens)", ylabel=ylabel)
            if key == "padding_waste":
                ax.set_ylim(0, 1)
            out[key] = _png(fig)
            plt.close(fig)
    s = a["speedup_over_ar"]
    if s and s.get("ar_tokens_per_s") and s.get("tokens_per_s"):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        bars = ax.bar(["AR", a["mode"] or "this job"], [s["ar_tokens_per_s"], s["tokens_per_s"]],
                      color=["#a5a5a5", "#4472c4"])
        ax.bar_label(bars, labels=["1.00x", f"{s['speedup']:.2f}x"])
        ax.set_ylim(0, 1.15 * max(s["ar_tokens_per_s"], s["tokens_per_s"]))  # room for the labels
        ax.set(title=f"Speedup over AR: {s['speedup']:.2f}x", ylabel="tokens/s while decoding")
        out["speedup"] = _png(fig)
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


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_html(a: dict[str, Any]) -> str:
    images = plots(a)
    esc = html.escape
    job = Figures.from_dict(a)
    summary = [("rows in", a["rows_in"]), ("completions", a["completions"]), ("dead letters", a["dead_letters"]),
               ("prompt tokens", a["prompt_tokens"]), ("completion tokens", a["completion_tokens"]),
               ("wall time", format_seconds(job.wall_seconds)), ("model load", format_seconds(job.load_seconds)),
               ("compile time", format_seconds(job.compile_seconds)),
               ("decode time", format_seconds(job.decode_seconds)),
               ("tokens/s over wall time", format_rate(job.tokens_per_s)),
               ("tokens/s while decoding", format_rate(job.decode_tokens_per_s)), ("tau mean", _f(a["tau_mean"])),
               ("speedup over AR", _f((a["speedup_over_ar"] or {}).get("speedup"), "{:.2f}x"))]
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in summary)
    runs = ""
    if len(a["runs"]) > 1:
        cells = "".join(
            f"<tr><td>{esc(str(r['job_id']))}</td><td>{format_seconds(f.wall_seconds)}</td>"
            f"<td>{format_seconds(f.compile_seconds)}</td><td>{format_seconds(f.decode_seconds)}</td>"
            f"<td>{f.completion_tokens}</td><td>{format_rate(f.decode_tokens_per_s)}</td></tr>"
            for r in a["runs"] for f in [Figures.from_dict(r)])
        runs = (f"<h2>Runs</h2><p>A resume is a run of its own; the figures above are summed over these.</p>"
                "<table><tr><th>run</th><th>wall</th><th>compile</th><th>decode</th><th>completion tokens</th>"
                f"<th>tokens/s while decoding</th></tr>{cells}</table>")
    bucket_rows = "".join(
        f"<tr><td>{b['bucket']}</td><td>{b['rows']}</td><td>{b['calls']}</td><td>{_f(b['batch_fill'], '{:.0%}')}</td>"
        f"<td>{b['padding_waste']:.0%}</td><td>{_f(b['tokens_per_s'], '{:.1f}')}</td></tr>" for b in a["buckets"])
    imgs = "".join(f'<figure><img data-plot="{k}" alt="{esc(CAPTIONS[k])}" src="data:image/png;base64,{v}">'
                   f"<figcaption>{esc(CAPTIONS[k])}</figcaption></figure>" for k, v in images.items())
    hint = "" if a["speedup_over_ar"] else f'<p class="hint">{baseline_hint(a)}</p>'
    dead = "".join(f"<li>{n} x {esc(kind)}: e.g. {esc(a['dead_letter_examples'].get(kind, ''))}</li>"
                   for kind, n in a["dead_letters_by_kind"].items())
    choice = "".join(f"<li>{esc(choice_line(c))}</li>" for c in a["block_choice"])
    choice_html = f"<h2>Automatic block length</h2><ul>{choice}</ul>" if choice else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>dflash-batch audit: {esc(str(a['name']))}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}th{{text-align:left}}
figure{{display:inline-block;margin:0 1em 1em 0;vertical-align:top}}figcaption{{max-width:30em;font-size:90%}}
.hint{{color:#555}}</style></head><body>
<h1>Job {esc(str(a['name']))}</h1>
<p>{esc(str(a['job_id']))}: mode {esc(str(a['mode']))}, dtype {esc(str(a.get('dtype') or '-'))},
batch {a['batch_size']}, block {esc(str(a['block_size']))}, hardware {esc(str(a['hardware'] or '-'))}. Output: {esc(a['output'])}</p>
<table>{rows}</table>
{hint}
{runs}
<h2>Buckets</h2>
<table><tr><th>bucket</th><th>rows</th><th>decoder calls</th><th>batch fill</th><th>padding waste</th>
<th>tokens/s while decoding</th></tr>{bucket_rows}</table>
{choice_html}
<h2>Plots</h2>{imgs}
<h2>Dead letters</h2><ul>{dead or '<li>none</li>'}</ul>
<p><small>tau = tokens committed per target decode step, bonus token included. Decode time holds the prompts'
prefill and the decode steps, after compiling.</small></p>
</body></html>"""
