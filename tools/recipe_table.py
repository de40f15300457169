"""The drafter-recipe comparison's table (``tools/compare_drafter_recipes.sh``): one row per
recipe, read from each run's ``summary.json``, with the shipped drafter measured on the same
test prompts beside them.

    python tools/recipe_table.py WORK base full kl b8 l1
"""

from __future__ import annotations

import json
from pathlib import Path

import click

# What each recipe changes against the current one (tools/train_default_drafter.sh).
CHANGES = {
    "base": "the current recipe: block 16, 2 layers, 0.5 x hard labels + 0.5 x target top-32",
    "full": "the soft half is the KL to the target's full distribution over the draft vocabulary",
    "kl": "KL to the full distribution only (distill 1.0, no hard labels)",
    "b8": "trained at block 8 (compare at decode block 8)",
    "l1": "one draft layer instead of two",
    "shipped": "the shipped drafter (its card: decoder/drafters/smollm2-135m-instruct/README.md), for reference",
}
TEST_COLUMNS = ("dflash_b16", "dflash_b8", "ngram_b16", "hybrid_b16")


def recipe_row(name: str, summary: dict) -> dict:
    """The table's figures for one finished run's summary."""
    evals = summary.get("evals") or [{}]
    test = summary.get("test") or {}
    return {
        "recipe": name, "change": CHANGES.get(name, ""), "step": summary.get("step"),
        "predicted_tokens": summary.get("predicted_tokens"),
        "train_minutes": summary["train_seconds"] / 60 if "train_seconds" in summary else None,
        "heldout_tau": evals[-1].get("decoder_tau"),
        "train_prompts": (summary.get("prompts") or {}).get("train"),
        "response_tokens": (summary.get("tokens") or {}).get("train_response"),
        **{c: (test.get(c) or {}).get("tau") for c in TEST_COLUMNS},
        "test_prompts": test.get("prompts"), "test_max_new_tokens": test.get("max_new_tokens"),
    }


def _cell(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render(rows: list[dict]) -> str:
    """A markdown table of ``recipe_row`` rows (``-`` where a figure does not apply)."""
    head = ("| recipe | steps | predicted tokens | train min | held-out tau (B16 drafts, decoder) "
            "| test dflash B16 | test dflash B8 | test ngram B16 | test hybrid B16 |")
    lines = [head, "|" + "---|" * 2 + "---:|" * 7]
    for r in rows:
        lines.append(f"| {r['recipe']} | {_cell(r['step'], 'd')} | {_cell(r['predicted_tokens'], ',d')} "
                     f"| {_cell(r['train_minutes'], '.1f')} | {_cell(r['heldout_tau'], '.3f')} "
                     + " ".join(f"| {_cell(r[c], '.3f')}" for c in TEST_COLUMNS) + " |")
    lines.append("")
    lines += [f"- {r['recipe']}: {r['change']}" for r in rows if r["change"]]
    return "\n".join(lines)


@click.command()
@click.argument("work", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("recipes", nargs=-1, required=True)
@click.option("--shipped", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A drafter folder to evaluate on the same test prompts (row 'shipped').")
def main(work: Path, recipes: tuple[str, ...], shipped: Path | None) -> None:
    rows = []
    test = None
    for name in recipes:
        path = work / name / "summary.json"
        if not path.exists():
            raise click.ClickException(f"{path} is missing: run that recipe first")
        summary = json.loads(path.read_text())
        rows.append(recipe_row(name, summary))
        test = test or summary.get("test")
    if shipped is not None and test:
        from dflash_batch.decoder import load_target
        from dflash_batch.jobs._train_cli import evaluate_test

        target = load_target(json.loads((work / recipes[0] / "summary.json").read_text())["target"])
        limit = int(test["prompts"])
        result = evaluate_test(target, shipped, Path(test["source"]), limit, int(test["max_new_tokens"]),
                               record=work / "shipped-test-eval.json")
        rows.append(recipe_row("shipped", {"test": result}))
    table = render(rows)
    (work / "recipes.md").write_text(table + "\n")
    (work / "recipes.json").write_text(json.dumps(rows, indent=2))
    click.echo(table)


if __name__ == "__main__":
    main()
