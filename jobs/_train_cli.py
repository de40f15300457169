"""``dflash-batch train-drafter``: prompts Parquet in, a DFlash drafter (z-lab format) and its training summary out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dflash_batch.decoder import DEFAULT_MODEL, DTYPES
from dflash_batch.decoder.train import DataConfig, DrafterSpec, TrainConfig
from dflash_batch.jobs._settings_options import settings_from, settings_options


EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: the run checkpointed and can be resumed
# Every field of these is an option of the command, with the field's default, help and bounds.
SETTINGS = (DrafterSpec, TrainConfig, DataConfig)


def read_prompts(path: Path, tokenizer, template: str = "auto", limit: int = 0
                 ) -> tuple[list[tuple[str, list[int]]], list[str]]:
    """(id, token ids) of every valid row of a prompts Parquet file, and a reason per bad row.

    ``template`` ``auto`` picks ``summarize`` when the file has a ``document`` column and
    ``none`` (``prompt`` or ``messages``) otherwise, as a job would be configured.
    """
    import pyarrow.parquet as pq

    from dflash_batch.decoder import render_row
    from dflash_batch.schemas import check_input_schema, validate_prompt_row

    table = pq.read_table(path)
    if template == "auto":
        template = "summarize" if "document" in table.column_names else "none"
    check_input_schema(table.schema, template)
    seen: set[str] = set()
    out: list[tuple[str, list[int]]] = []
    bad: list[str] = []
    for row in table.to_pylist():
        reason = validate_prompt_row(row, template, seen)
        if reason:
            bad.append(f"{row.get('id')!r}: {reason}")
            continue
        out.append((row["id"], render_row(tokenizer, row, template)))  # as the job renders it
        if limit and len(out) >= limit:
            break
    return out, bad


def deadlines(t_start: float, time_budget: float, gen_budget: float | None, eval_reserve: float | None
              ) -> tuple[float | None, float | None]:
    """(end of response generation, end of training) as ``time.time()`` values, None for no limit.

    A generation budget also works without a time budget: the data set then grows by the hour,
    and training runs to its step count.
    """
    gen_deadline = deadline = None
    if gen_budget is not None or time_budget:
        gen_deadline = t_start + (0.4 * time_budget if gen_budget is None else gen_budget)
    if time_budget:
        deadline = t_start + time_budget - (0.2 * time_budget if eval_reserve is None else eval_reserve)
    return gen_deadline, deadline


def target_dtype(setting: str, target: str) -> str:
    """``--dtype`` resolved for this machine and the target's checkpoint, as a job resolves its
    ``[model] dtype`` (``decoder.resolve_dtype``): the target, the drafter's evaluation and the
    target's responses and features are computed in it."""
    from dflash_batch.decoder import resolve_dtype, resolve_model_dir

    config = json.loads((resolve_model_dir(target) / "config.json").read_text())
    return resolve_dtype(setting, config)


def load_prompts(tokenizer, path: Path, template: str, limit: int, max_prompt_tokens: int
                 ) -> list[tuple[str, list[int]]]:
    """The prompts to train on, as ``read_prompts`` reads them, without those over
    ``max_prompt_tokens`` (0: no limit); what is skipped is said on stderr."""
    prompts, bad = read_prompts(path, tokenizer, template, limit)
    if bad:
        click.echo(f"skipped {len(bad)} invalid prompt rows, e.g. {bad[0]}", err=True)
    if max_prompt_tokens:
        kept = [p for p in prompts if len(p[1]) <= max_prompt_tokens]
        if len(kept) < len(prompts):
            click.echo(f"skipped {len(prompts) - len(kept)} prompts over {max_prompt_tokens} tokens", err=True)
        prompts = kept
    if not prompts:
        raise click.ClickException(f"no valid prompts in {path}")
    return prompts


def _settings(params: dict) -> tuple:
    """(DrafterSpec, TrainConfig, DataConfig) from the parsed options."""
    from dflash_batch.decoder.train import SettingsError

    try:
        return tuple(settings_from(cls, params) for cls in SETTINGS)
    except SettingsError as e:
        raise click.UsageError(str(e)) from None


@click.command("train-drafter")
@click.option("--target", default=DEFAULT_MODEL, show_default=True, help="Target model name, folder or gs:// prefix.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPES),
              help="The target's dtype (its responses, features and the evaluation), as a job's model.dtype; "
                   "auto: bfloat16 on TPU/GPU, the faster one on CPU.")
@click.option("--prompts", "prompts_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prompts Parquet (job prompt schema).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Drafter folder to write.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Responses, features and checkpoints [default: <cache>/train/<out folder name>].")
@click.option("--template", default="auto", show_default=True, type=click.Choice(["auto", "summarize", "none"]))
@click.option("--limit", default=0, show_default=True, type=click.IntRange(0), help="Use the first N prompts (0: all).")
@click.option("--max-prompt-tokens", default=0, show_default=True, type=click.IntRange(0),
              help="Skip prompts longer than this (0: none); online training pads every batch to the longest.")
@click.option("--resume", is_flag=True, help="Continue the checkpoint in the work dir.")
@click.option("--stop-at", type=click.IntRange(1), help="End this call after this step (the schedule keeps --steps).")
@click.option("--test-prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Evaluation prompts Parquet: tau (dflash at B=16 and 8, ngram at 16) goes into the model card.")
@click.option("--test-limit", default=0, show_default=True, type=click.IntRange(0))
@click.option("--test-max-new-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--time-budget", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Wall-clock seconds for this call (0: none). Generation ends by --gen-budget, training "
              "--eval-reserve before the end; both checkpoint, and --resume continues.")
@click.option("--gen-budget", type=click.FloatRange(0), help="Seconds from the start for generating responses "
              "[default: 40% of --time-budget].")
@click.option("--eval-reserve", type=click.FloatRange(0), help="Seconds kept after training for the test "
              "evaluation and the export [default: 20% of --time-budget].")
@settings_options(*SETTINGS)
def train_drafter_command(target: str, dtype: str, prompts_path: Path, out: Path, work_dir: Path | None,
                          template: str, limit: int, max_prompt_tokens: int, resume: bool, stop_at: int | None,
                          test_prompts: Path | None, test_limit: int, test_max_new_tokens: int, time_budget: float,
                          gen_budget: float | None, eval_reserve: float | None, **settings) -> None:
    """Train a DFlash drafter for TARGET on its own greedy responses to PROMPTS.

    Everything slow is cached in the work dir (responses, target features, checkpoints),
    so an interrupted run continues with --resume. The drafter is written to OUT in the
    z-lab format (bf16), with the run's summary (``training_summary.json``: data, settings,
    held-out tau by step, test tau) beside it.
    """
    import time

    from dflash_batch.decoder import cache_dir, jnp_dtype, load_target
    from dflash_batch.decoder.train import SUMMARY_FILE, train_drafter

    spec, tcfg, data = _settings(settings)
    t_start = time.time()
    gen_deadline, deadline = deadlines(t_start, time_budget, gen_budget, eval_reserve)
    dtype = target_dtype(dtype, target)
    tgt = load_target(target, dtype=jnp_dtype(dtype))
    prompts = load_prompts(tgt.tokenizer, prompts_path, template, limit, max_prompt_tokens)
    work_dir = work_dir or cache_dir() / "train" / out.name
    try:
        summary = train_drafter(tgt, prompts, out, work_dir=work_dir, spec=spec, tcfg=tcfg, data=data, resume=resume,
                                stop_at=stop_at, log=lambda m: click.echo(m, err=True),
                                gen_deadline=gen_deadline, deadline=deadline)
    except (FileExistsError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    budget_spent = deadline is not None and not summary["finished"] and time.time() >= deadline
    if test_prompts is not None and (summary["finished"] or budget_spent):
        summary["test"] = evaluate_test(tgt, out, test_prompts, test_limit, test_max_new_tokens,
                                        record=work_dir / "test-eval.json", dtype=dtype)
        (work_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    click.echo(json.dumps({k: summary[k] for k in ("out_dir", "step", "finished", "evals", "train_seconds")} |
                          {"test": summary.get("test")}, indent=2, default=str))
    if budget_spent:
        click.echo(f"time budget spent at step {summary['step']} of {tcfg.steps}; continue with --resume", err=True)
    elif not summary["finished"] and (stop_at is None or summary["step"] < stop_at):
        # Stopped by a signal before its end: a supervisor may rerun with --resume.
        click.echo(f"interrupted at step {summary['step']}; continue with --resume", err=True)
        sys.exit(EXIT_INTERRUPTED)


# The model card's evaluation: the drafter at its block and at 8, against the free n-gram peer and
# the hybrid of both.
TEST_RUNS = (("dflash_b16", "dflash", 16), ("dflash_b8", "dflash", 8), ("ngram_b16", "ngram", 16),
             ("hybrid_b16", "hybrid", 16))


def evaluate_test(target, drafter_dir: Path, prompts_path: Path, limit: int, max_new_tokens: int,
                  record: Path | None = None, dtype: str | None = None) -> dict:
    """tau of the saved (bf16) drafter on evaluation prompts, with the n-gram peer beside it,
    loaded in ``dtype`` (default: the target's).

    With ``record``, each finished run is kept there, keyed by the drafter's weights and the
    evaluation settings, so a resumed call measures only what is missing.
    """
    import hashlib

    from dflash_batch.decoder import jnp_dtype, load_drafter
    from dflash_batch.decoder.train import decode_tau

    prompts, _ = read_prompts(prompts_path, target.tokenizer, "auto", limit)
    dtype = dtype or str(target.params["embed"].dtype)  # the drafter computes in its target's dtype
    drafter = load_drafter(drafter_dir, dtype=jnp_dtype(dtype))
    out = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "source": str(prompts_path), "dtype": dtype}
    key = hashlib.sha256((drafter_dir / "model.safetensors").read_bytes()
                         + json.dumps([str(prompts_path), limit, max_new_tokens, dtype]).encode()).hexdigest()
    done = json.loads(record.read_text()) if record is not None and record.exists() else {}
    done = done if done.get("key") == key else {"key": key}
    for name, mode, blk in TEST_RUNS:
        if mode != "ngram" and blk > drafter.config.block_size:
            continue
        if name not in done:
            r = decode_tau(target, prompts, mode=mode, drafter=drafter if mode != "ngram" else None, block_size=blk,
                           max_new_tokens=max_new_tokens)
            done[name] = {"tau": r["tau"], "tau_mean": r["tau_mean"], "seconds": r["seconds"]}
            if record is not None:
                record.write_text(json.dumps(done))
        out[name] = done[name]
    return out


if __name__ == "__main__":  # ``python -m dflash_batch.jobs._train_cli``: train-drafter where Beam is not installed
    train_drafter_command()
