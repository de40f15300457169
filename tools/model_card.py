"""A trained drafter's model card (README.md) and its tau-against-compute plot.

    python tools/model_card.py DRAFTER_DIR [--data-note TEXT] [--shape-note TEXT]

``dflash-batch train-drafter`` writes ``training_summary.json`` beside the drafter; this tool
renders it as the card a published drafter carries (the shipped one's is
``decoder/drafters/smollm2-135m-instruct/README.md``): what the drafter is, what it was trained
on and with, and how well it drafts, against the free n-gram peer.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import click

from dflash_batch.decoder.train import SUMMARY_FILE
from dflash_batch.jobs._train_cli import TEST_RUNS


def model_card(s: dict, data_note: str = "", shape_note: str = "") -> str:
    """The drafter's README.md: what it is, what it was trained on and with, and how well it drafts."""
    d, spec, t = s["drafter"], s["spec"], s["train_config"]
    dfl = d["dflash_config"]
    timing = s.get("timings", {})
    evals = s.get("evals", [])
    last = evals[-1] if evals else {}
    first = evals[0] if evals and evals[0]["step"] == 0 else {}
    lines = [
        f"# DFlash drafter for {s['target']}",
        "",
        f"A {d['num_hidden_layers']}-layer DFlash block-diffusion drafter (block size {d['block_size']}) for "
        f"`{s['target']}`, in z-lab's checkpoint format (`config.json` + `model.safetensors`, bf16). "
        "Trained with `dflash-batch train-drafter`; "
        + ("training is **finished**." if s["finished"] else f"**training is not finished** (step {s['step']} of "
           f"{t['steps']}): this is the latest checkpoint."),
        "",
        "Extensions recorded in `dflash_config` (see `decoder/_drafter_config.py`):",
        (f"- `mask_embedding: true`: the target has no spare token row, so a learned mask vector (tensor "
         f"`mask_embedding`) replaces the embedding of `mask_token_id` ({dfl['mask_token_id']}) at block positions "
         "1..B-1." if dfl.get("mask_embedding")
         else f"- mask token: id {dfl['mask_token_id']} (no learned mask embedding)."),
        (f"- `draft_vocab_size: {dfl['draft_vocab_size']}`: the drafter scores only the most frequent target tokens "
         "of its training responses with its own `lm_head`; tensor `d2t` maps them to target ids (coverage of "
         f"held-out response tokens: {s['vocab']['heldout_coverage']:.2%}). The target verifies every draft, so "
         "outputs stay lossless." if dfl.get("draft_vocab_size") else
         "- full target vocabulary: the drafter borrows the target's lm_head."),
        f"- Context features: outputs of target layers {dfl['target_layer_ids']}.",
        "",
        "## Shape, and why",
        "",
        f"{d['num_hidden_layers']} draft layer(s) of the target's own layer shape (hidden {d['hidden_size']}, "
        f"{d['num_attention_heads']} heads / {d['num_key_value_heads']} KV heads, MLP {d['intermediate_size']}), "
        + (f"continued from the drafter `{spec['init_drafter']}`." if spec.get("init_drafter") else
           "started from target layers." if spec["init_from_target"] else "started from noise.")
        + (f" {shape_note}" if shape_note else ""),
        "",
        "## Training data",
        "",
        data_note or "(not recorded)",
        "",
        f"- Prompts: {s['prompts']['train']} for training, {s['prompts']['heldout']} held out for evaluation.",
        f"- Tokens: {s['tokens']['prompt']:,} prompt tokens; {s['tokens']['response']:,} response tokens (the "
        "target's own greedy responses, generated with this project's decoder).",
        "",
        "## Training",
        "",
        f"- Steps: {s['step']} of {t['steps']}; {t['batch_size']} sequences x {t['anchors']} blocks per step; "
        f"AdamW lr {t['lr']}, warmup {t['warmup']:.0%}, cosine, clip {t['clip']}, weight decay {t['weight_decay']}; "
        f"loss: {1 - t['distill']:.2g} x hard labels + {t['distill']:.2g} x "
        + ("the target's full distribution over the draft vocabulary (KL), " if t.get("teacher") == "full" else
           f"target top-{t['top_k']} distribution, ") +
        "position weights exp(-(k-1)/gamma).",
        f"- Shipped weights: the step-{s.get('exported_step', s['step'])} drafter, the evaluated one with the best "
        "held-out tau (the last step's when none was evaluated).",
        f"- Predicted tokens: {s['predicted_tokens']:,}; training wall time {s['train_seconds'] / 3600:.2f} h "
        f"({s['train_tokens_per_s']:.0f} predicted tokens/s).",
        (f"- Data preparation: responses {timing.get('responses', 0) / 60:.1f} min; the target's features were "
         "computed online, inside each training step (no feature cache)." if s.get("online") else
         f"- Data preparation: responses {timing.get('responses', 0) / 60:.1f} min, target features "
         f"{timing.get('features', 0) / 60:.1f} min."),
        f"- Hardware: {s['hardware']}" + (f"; data-parallel over {s['devices']} devices." if s.get("devices", 1) > 1
                                          else "."),
        "",
        "## Acceptance (tau = tokens committed per verify step, bonus token included, greedy)",
        "",
    ]
    if first:
        start = "the drafter it continued" if spec.get("init_drafter") else "untrained drafter"
        lines.append(f"- Held-out prompts, {start}: tau {first.get('decoder_tau', float('nan')):.3f}.")
    if last:
        lines.append(f"- Held-out prompts at step {last['step']}: tau {last.get('decoder_tau', float('nan')):.3f} "
                     f"(block {d['block_size']}, {s.get('eval_max_new_tokens', '')} new tokens).")
    curve = [e for e in evals if "decoder_tau" in e]
    if len(curve) > 1:
        lines += ["", "tau on the held-out prompts against training compute (plot: `tau_vs_compute.png`):", "",
                  "| step | predicted tokens | training hours | tau (decoder) | tau (held-out blocks, harmonic) |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {e['step']} | {e.get('predicted_tokens', 0):,} | {e.get('train_seconds', 0) / 3600:.2f} | "
                  f"{e['decoder_tau']:.3f} | {e.get('heldout_tau_h', float('nan')):.3f} |" for e in curve]
        lines.append("")
    test = s.get("test")
    if test:
        lines.append(f"- Evaluation set `{Path(test['source']).name}` ({test['prompts']} prompts, "
                     f"{test['max_new_tokens']} new tokens):")
        for k, _, _ in TEST_RUNS:
            if k in test:
                lines.append(f"  - {k}: tau {test[k]['tau']:.3f} (per-request mean {test[k]['tau_mean']:.3f})")
        if "dflash_b16" in test and "ngram_b16" in test:
            dfl, ng = test["dflash_b16"]["tau"], test["ngram_b16"]["tau"]
            lines.append(f"- Against the free n-gram peer at block 16: {dfl:.2f} vs {ng:.2f}, so this drafter "
                         + ("beats it." if dfl > ng else "does NOT beat it: on this data use mode `hybrid` (or "
                            "`ngram`), which verifies the n-gram match where it promises more."))
    lines += ["", "## Licence", "",
              "The weights derive from the target model's (layers, output rows) and follow its licence"
              + (" (SmolLM2: Apache-2.0)." if "smollm2" in str(s["target"]).lower() else "."), "",
              f"_Card written {datetime.date.today().isoformat()} by `tools/model_card.py` from `dflash-batch train-drafter`'s summary._", ""]
    return "\n".join(lines)


def plot_tau_curve(evals: list[dict], path: Path, block_size: int) -> Path | None:
    """Held-out tau (real decoder, and the cheap per-block estimate) against predicted tokens."""
    curve = [e for e in evals if "decoder_tau" in e]
    if len(curve) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [e.get("predicted_tokens", 0) / 1e6 for e in curve]
    hours = [e.get("train_seconds", 0) / 3600 for e in curve]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot(x, [e["decoder_tau"] for e in curve], "o-", label=f"decoder tau (block {block_size}, held-out prompts)")
    if all("heldout_tau_h" in e for e in curve):
        ax.plot(x, [e["heldout_tau_h"] for e in curve], "s--", alpha=0.7, label="held-out blocks (harmonic tau)")
    ax.set_xlabel("training compute: predicted tokens (millions)")
    ax.set_ylabel("tau (tokens per verify step)")
    top = ax.secondary_xaxis("top", functions=(lambda v: v, lambda v: v))
    top.set_ticks(x[:: max(1, len(x) // 5)], labels=[f"{h:.2f} h" for h in hours[:: max(1, len(x) // 5)]])
    top.set_xlabel("training wall time on this hardware")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


@click.command()
@click.argument("drafter_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data-note", default="", help="Training data and licence.")
@click.option("--shape-note", default="", help="Why this drafter shape.")
def main(drafter_dir: Path, data_note: str, shape_note: str) -> None:
    """Write DRAFTER_DIR/README.md and tau_vs_compute.png from its training summary."""
    path = drafter_dir / SUMMARY_FILE
    if not path.exists():
        raise click.ClickException(f"{path} is missing: train the drafter with `dflash-batch train-drafter` first")
    summary = json.loads(path.read_text())
    (drafter_dir / "README.md").write_text(model_card(summary, data_note, shape_note))
    plot_tau_curve(summary.get("evals", []), drafter_dir / "tau_vs_compute.png", summary["drafter"]["block_size"])
    click.echo(f"wrote {drafter_dir / 'README.md'}")


if __name__ == "__main__":
    main()
