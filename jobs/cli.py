"""The ``dflash-batch`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dflash_batch.decoder import DEFAULT_MODEL


def _requests(target, split: str, limit: int, max_new_tokens: int):
    from dflash_batch.decoder import Request, render_messages
    from dflash_batch.jobs._datasets import aclsum_abstracts
    from dflash_batch.pipeline._templates import summarize_messages

    docs = aclsum_abstracts(split)[:limit]
    return [Request(id=d["id"], token_ids=render_messages(target.tokenizer, summarize_messages(d["document"])),
                    max_new_tokens=max_new_tokens) for d in docs]


def _int_list(_ctx, _param, value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return out


@click.group()
@click.version_option(package_name="dflash-batch")
def main() -> None:
    """Offline batch generation jobs with DFlash speculative decoding."""
    from dflash_batch.decoder import enable_compilation_cache

    enable_compilation_cache()


@main.command("import-model")
@click.argument("name", default=DEFAULT_MODEL)
def import_model(name: str) -> None:
    """Import NAME (default: the embedded SmolLM2-135M-Instruct) into the local cache."""
    from dflash_batch.decoder import resolve_model_dir

    try:
        folder = resolve_model_dir(name)
    except (ValueError, ModuleNotFoundError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(str(folder))


@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model name, folder or gs:// prefix.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]),
              help="ACLSum split whose abstracts are summarized.")
@click.option("--limit", default=8, show_default=True, type=click.IntRange(1), help="Number of abstracts.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1))
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--output", default="demo-output", show_default=True, type=click.Path(path_type=Path))
def generate(model: str, split: str, limit: int, batch_size: int, max_new_tokens: int, output: Path) -> None:
    """Summarize ACLSum abstracts with the model and write completions Parquet."""
    from dflash_batch.decoder import load_target
    from dflash_batch.jobs._generate import run_generate

    target = load_target(model)
    summary = run_generate(target, _requests(target, split, limit, max_new_tokens), output, batch_size, max_new_tokens)
    click.echo(json.dumps(summary, indent=2))
    click.echo(f"completions written to {summary['path']}")


@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--num-prompts", default=8, show_default=True, type=click.IntRange(1))
@click.option("--batch-sizes", default="1,8", show_default=True, callback=_int_list)
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1), help="Median over this many runs.")
@click.option("--no-hf", is_flag=True, help="Skip the transformers baseline.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def bench(model: str, num_prompts: int, batch_sizes: list[int], max_new_tokens: int, repeats: int, no_hf: bool,
          as_json: bool) -> None:
    """Tokens/s of our decoder against transformers' generate on ACLSum test abstracts."""
    from dflash_batch.decoder import load_target
    from dflash_batch.jobs._bench import bench_ar, format_table

    target = load_target(model)
    reqs = _requests(target, "test", num_prompts, max_new_tokens)
    rows = bench_ar(target, reqs, batch_sizes, max_new_tokens, repeats, with_hf=not no_hf,
                    progress=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(f"greedy, {len(reqs)} ACLSum test abstracts, {max_new_tokens} new tokens, median of {repeats}")
        click.echo(format_table(rows))


if __name__ == "__main__":
    sys.exit(main())
