"""The ``dflash-batch`` command line."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Sequence

import click

from dflash_batch.decoder import DEFAULT_MODEL
from dflash_batch.jobs._exit import Refused


def _requests(target, split: str, limit: int, max_new_tokens: int):
    from dflash_batch.decoder import Request, render_messages
    from dflash_batch.jobs._datasets import aclsum_abstracts
    from dflash_batch.decoder import summarize_messages

    docs = aclsum_abstracts(split)[:limit]
    return [Request(id=d["id"], token_ids=render_messages(target.tokenizer, summarize_messages(d["document"])),
                    max_new_tokens=max_new_tokens) for d in docs]


def _int_list(_ctx, _param, value: str, allow_empty: bool = False) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if (not out and not allow_empty) or min(out, default=1) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return out


@click.group()
@click.version_option(package_name="dflash-batch")
def main() -> None:
    """Offline batch generation jobs with DFlash speculative decoding.

    Exit status, for every command: 0 done, 1 the work started and failed, 2 refused before
    any work (a bad job spec or argument, or wrong usage).
    """
    from dflash_batch.decoder import enable_compilation_cache

    enable_compilation_cache()


@main.command("import-model")
@click.argument("name", default=DEFAULT_MODEL)
def import_model(name: str) -> None:
    """Import NAME (default: the embedded SmolLM2-135M-Instruct) into the local cache."""
    from dflash_batch.decoder import resolve_model_dir

    try:
        folder = resolve_model_dir(name)
    except ValueError as e:
        raise Refused(str(e)) from None
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(str(folder))


def _job_requests(job_file: Path, overrides: Sequence[str], limit: int):
    """The first ``limit`` rows of a job's input as the job would decode them (its template,
    sampling settings and seeds), with the job's spec."""
    import dataclasses
    import tempfile

    from dflash_batch.jobs._bench_pipeline import _prepared
    from dflash_batch.jobs._spec import SpecError, load_spec
    from dflash_batch.pipeline import JobRefused, build

    try:
        spec = load_spec(job_file, overrides).require_direct()
        with tempfile.TemporaryDirectory(prefix="dflash-bench-") as tmp:
            job = build(dataclasses.replace(spec, output=f"{tmp}/probe"))
    except (SpecError, JobRefused, ValueError) as e:
        raise Refused(str(e)) from None
    items = _prepared(job)[:limit]
    if not items:
        raise Refused(f"{job_file}: no row of the input can be decoded")
    return [it.request() for it in items], spec


@main.command()
@click.argument("job_file", required=False, type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a value of JOB_FILE.")
@click.option("--model", default=None, help=f"Target model name, folder or gs:// prefix [default: the job's, else "
              f"{DEFAULT_MODEL}].")
@click.option("--drafter", default=None,
              help="DFlash drafter: 'default' (shipped for the model), a folder, gs://..., or 'none' "
                   "[default: the job's, else 'default'].")
@click.option("--num-prompts", default=None, type=click.IntRange(1),
              help="Prompts each batch size decodes: the first N rows of the job's input, or N ACLSum test "
                   "abstracts [default: 4 per slot, what a job's decoder call gets by default].")
@click.option("--batch-sizes", default="1,4,16", show_default=True, callback=_int_list)
@click.option("--block-sizes", default="8,16", show_default=True,
              callback=functools.partial(_int_list, allow_empty=True),
              help="Fixed block lengths to compare beside the automatic choice ('' for auto only).")
@click.option("--modes", default="dflash,ngram,hybrid", show_default=True, help="Speculative modes to compare with AR.")
@click.option("--max-new-tokens", default=None, type=click.IntRange(1),
              help="[default: the job's decode.max_new_tokens, else 128]")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1),
              help="Rounds: every configuration runs once per round; medians over the rounds.")
@click.option("--learning-rounds", default=1, show_default=True, type=click.IntRange(0),
              help="Rounds run first and not counted, where the automatic block choice learns acceptance "
                   "(as over a job's first rows).")
@click.option("--ar-control", is_flag=True,
              help="Also run a second AR decoder in the same rounds: its ratio to AR is the bench's own noise.")
@click.option("--hf", "with_hf", is_flag=True, help="Also run transformers' generate (greedy) on the same prompts.")
@click.option("--dtypes", default=None, help="Dtypes to compare in the same rounds, e.g. float32,bfloat16 (auto: "
              "resolved for this machine) [default: the job's model.dtype, else auto].")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@click.option("--data-parallel", default=None, help="Data-parallel degree or 'auto' [default: the job's, else 1].")
@click.option("--tensor-parallel", default=None, help="Tensor-parallel degree or 'auto' [default: the job's, else 1].")
def bench(job_file: Path | None, overrides: tuple[str, ...], model: str | None, drafter: str | None,
          num_prompts: int | None,
          batch_sizes: list[int], block_sizes: list[int], modes: str, max_new_tokens: int | None, repeats: int,
          learning_rounds: int, ar_control: bool, with_hf: bool, dtypes: str | None, as_json: bool,
          data_parallel: str | None, tensor_parallel: str | None) -> None:
    """AR vs DFlash vs n-gram vs hybrid (and transformers) on the same prompts, in one run.

    With JOB_FILE, the prompts are the job's own input rows, rendered by its template, with its
    model, drafter, sampling settings and prompt buckets; without it, ACLSum test abstracts,
    greedy, on the default model. tau counts the bonus token: it is the mean number of tokens
    a decode step commits.
    """
    from dflash_batch.decoder import DRAFTER_MODES, resolve_drafter_dir
    from dflash_batch.decoder import ROWS_PER_SLOT
    from dflash_batch.jobs._bench import bench as run_bench
    from dflash_batch.jobs._bench import bench_dtypes, format_table, load_bench_models

    spec = None
    most = num_prompts or ROWS_PER_SLOT * max(batch_sizes)
    if job_file is not None:
        if max_new_tokens:  # the job as if its spec said so (rows asking for more are left out)
            overrides = (*overrides, f"decode.max_new_tokens={max_new_tokens}")
        reqs, spec = _job_requests(job_file, overrides, most)
        model = model or spec.model.target
        drafter = drafter or spec.model.drafter  # even when the job itself decodes with ar
        max_new_tokens = spec.decode.max_new_tokens
        source = f"the first rows of {job_file}"
    elif overrides:
        raise click.UsageError("--set needs a JOB_FILE")
    model, drafter, max_new_tokens = model or DEFAULT_MODEL, drafter or "default", max_new_tokens or 128
    try:
        dtype_names = bench_dtypes(dtypes or (spec.model.dtype if spec is not None else "auto"), model)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--dtypes") from None
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    mesh = _bench_mesh(model, drafter, mode_list, batch_sizes, max_new_tokens, spec,
                       data_parallel or (spec.decode.data_parallel if spec else 1),
                       tensor_parallel or (spec.decode.tensor_parallel if spec else 1))
    folder = None
    if set(DRAFTER_MODES) & set(mode_list):
        try:
            folder = resolve_drafter_dir(drafter, model) if drafter != "none" else None
        except ValueError as e:
            if drafter != "default":
                raise Refused(str(e)) from None
            click.echo(f"skipping dflash and hybrid: {e}", err=True)
            folder = None
        if folder is None:
            mode_list = [m for m in mode_list if m not in DRAFTER_MODES]
    models = load_bench_models(model, folder, dtype_names, mesh)
    if spec is None:
        reqs = _requests(models[0].target, "test", most, max_new_tokens)
        source = "ACLSum test abstracts, greedy"
    rows = run_bench(models, reqs, batch_sizes, max_new_tokens, repeats=repeats,
                     block_sizes=block_sizes, modes=mode_list, with_hf=with_hf,
                     prompt_buckets=spec.decode.prompt_buckets if spec is not None else None, num_prompts=num_prompts,
                     learning_rounds=learning_rounds, ar_control=ar_control,
                     progress=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(f"{source} (rows: per batch size), up to {max_new_tokens} new tokens, {repeats} interleaved "
                   f"rounds after {learning_rounds} uncounted (tokens/s: median; vs AR: median of same-round "
                   "ratios to the AR of the same dtype); tau includes the bonus token")
        click.echo(format_table(rows))


def _degree(name: str, value) -> int | str:
    if value == "auto" or (isinstance(value, int) and value >= 1):
        return value
    if isinstance(value, str) and value.isdigit() and int(value) >= 1:
        return int(value)
    raise click.BadParameter(f"must be 'auto' or a positive integer, got {value!r}", param_hint=f"--{name}")


def _bench_mesh(model: str, drafter: str, modes: list[str], batch_sizes: list[int], max_new_tokens: int, spec,
                data_parallel, tensor_parallel):
    """The bench's mesh (None: one device), checked like a job's against this machine's devices."""
    from dflash_batch.decoder import DEFAULT_PROMPT_BUCKETS, DRAFTER_MODES, DecodeConfig, LayoutError, make_mesh
    from dflash_batch.pipeline import ModelKey, describe_devices, layout

    d, t = _degree("data-parallel", data_parallel), _degree("tensor-parallel", tensor_parallel)
    if (d, t) == (1, 1):
        return None
    spec_mode = next((m for m in modes if m in DRAFTER_MODES), None) if drafter != "none" else None
    decode = DecodeConfig(mode=spec_mode or "ar", batch_size=max(batch_sizes), max_new_tokens=max_new_tokens,
                          prompt_buckets=tuple(spec.decode.prompt_buckets if spec else DEFAULT_PROMPT_BUCKETS),
                          data_parallel=d, tensor_parallel=t)
    key = ModelKey(model=model, drafter=drafter if spec_mode else None, decode=decode)
    try:
        plan = layout(key)
    except LayoutError as e:
        raise click.ClickException(f"--{e.setting.replace('_', '-')}: {e}") from None
    uneven = [b for b in batch_sizes if b % plan.data]
    if uneven:
        raise click.BadParameter(f"{uneven} are not multiples of the data-parallel degree {plan.data}",
                                 param_hint="--batch-sizes")
    import jax

    if jax.default_backend() == "cpu":
        click.echo(f"bench: simulating a data {plan.data} x model {plan.model} mesh on {describe_devices()} "
                   "(CPU devices of one host): speed figures here mean nothing", err=True)
    return make_mesh(plan.data, plan.model)


from dflash_batch.jobs._run import run_command  # noqa: E402
from dflash_batch.jobs._example_input import make_example_input_command  # noqa: E402
from dflash_batch.jobs._bench_pipeline import bench_pipeline_command  # noqa: E402

main.add_command(run_command, "run")
main.add_command(make_example_input_command, "make-example-input")
main.add_command(bench_pipeline_command, "bench-pipeline")
from dflash_batch.jobs._train_cli import train_drafter_command  # noqa: E402
main.add_command(train_drafter_command, "train-drafter")
from dflash_batch.jobs._submit import submit_command  # noqa: E402
from dflash_batch.jobs._ledger import jobs_command  # noqa: E402
from dflash_batch.jobs._audit import audit_command  # noqa: E402
main.add_command(submit_command, "submit")
main.add_command(jobs_command, "jobs")
main.add_command(audit_command, "audit")

if __name__ == "__main__":
    sys.exit(main())
