"""``dflash-batch run JOB.toml [--set section.key=value ...]``: a job on this machine, with progress.

The spec is validated and the job checked (input files, schemas, model, output) before anything
runs; a refusal names the field to fix. While the job runs, a progress bar shows rows done out of
rows in, completion tokens/s and tau; at the end a summary says where everything went.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click


def _human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _top_reasons(files: list[str], n: int = 3) -> list[tuple[str, int]]:
    """The most common dead-letter reasons (read from the files just written)."""
    import collections

    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    counts: collections.Counter[str] = collections.Counter()
    for path in files:
        try:
            with FileSystems.open(path, compression_type="uncompressed") as f:
                counts.update(pq.read_table(f, columns=["error"]).column("error").to_pylist())
        except Exception:  # noqa: BLE001 - the summary must not fail over a listing
            continue
    return counts.most_common(n)


def format_summary(stats: dict[str, Any]) -> str:
    """A human summary of a job-stats record."""
    files = stats.get("files", {})
    tau = stats.get("tau_mean")
    waste = ", ".join(f"{b}: {w:.0%}" for b, w in json.loads(stats.get("padding_waste_json") or "{}").items())
    reasons = ", ".join(f"{r} x{n}" for r, n in sorted((stats.get("finish_reasons") or {}).items()))
    lines = [
        f"job {stats.get('name')} finished in {_human_seconds(stats.get('wall_seconds'))} (run {stats.get('run_id')})",
        f"  rows:    {stats.get('rows_in')} in -> {stats.get('completions_out')} completions "
        f"({stats.get('completions_this_run')} this run, {stats.get('skipped_completed')} done earlier), "
        f"{stats.get('dead_letters')} dead letters",
        f"  tokens:  {stats.get('prompt_tokens')} prompt, {stats.get('completion_tokens')} completion; "
        f"{stats.get('tokens_per_s') or 0:.1f} tokens/s over the job, "
        f"{stats.get('decode_tokens_per_s') or 0:.1f} while decoding",
        f"  decode:  mode {stats.get('mode')}, batch {stats.get('batch_size')}, block {stats.get('block_size')}, "
        f"tau {tau:.2f} (tokens per target step, bonus token included)" if tau is not None else
        f"  decode:  mode {stats.get('mode')}, batch {stats.get('batch_size')}, nothing decoded this run",
        f"  time:    compile {_human_seconds(stats.get('compile_seconds'))}, model load "
        f"{_human_seconds(stats.get('load_seconds'))}, {stats.get('model_loads')} model load(s) in "
        f"{len(stats.get('workers') or [])} worker process(es) on {stats.get('hardware')}",
    ]
    if reasons:
        lines.append(f"  finish:  {reasons}")
    if waste:
        lines.append(f"  padding: {waste} of padded prompt positions, by bucket")
    dead_files = files.get("dead_letters") or []
    if stats.get("dead_letters"):
        for reason, n in _top_reasons(dead_files):
            lines.append(f"  dead letter x{n}: {reason}")
    lines.append(f"output: {stats.get('output')}")
    for f in files.get("completions") or []:
        lines.append(f"  completions:  {f}")
    for f in dead_files:
        lines.append(f"  dead letters: {f}")
    lines.append(f"  job stats:    {stats.get('output')}/job_stats.json")
    return "\n".join(lines)


def run_with_progress(job, progress_dir: str, show: bool = True):
    """Runs a built job in a thread while the main thread draws the progress bar."""
    from tqdm import tqdm

    from dflash_batch.pipeline import read_progress

    outcome: dict[str, Any] = {}

    def target():
        try:
            outcome["result"] = job.run()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = e

    thread = threading.Thread(target=target, name="dflash-batch-job", daemon=True)
    t0 = time.perf_counter()
    thread.start()
    bar = tqdm(total=job.preflight.rows_in, unit="row", desc=job.config.name, disable=not show, dynamic_ncols=True)
    try:
        while thread.is_alive():
            thread.join(0.5)
            p = read_progress(progress_dir)
            bar.n = p["rows"] + p["dead_letters"] + p["skipped"]
            elapsed = time.perf_counter() - t0
            tau = f"{p['committed'] / p['steps']:.2f}" if p["steps"] else "-"
            bar.set_postfix_str(f"{p['completion_tokens'] / elapsed:.1f} tok/s, tau {tau}, "
                                f"{p['dead_letters']} dead", refresh=True)
    finally:
        bar.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@click.command("run")
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a spec value, e.g. --set decode.batch_size=4 (repeatable).")
@click.option("--no-progress", is_flag=True, help="Do not draw the progress bar.")
def run_command(job_file: Path, overrides: tuple[str, ...], no_progress: bool) -> None:
    """Run the job spec JOB_FILE (TOML) on this machine with Beam's DirectRunner.

    A rerun into the same output skips rows that already have completions, so an interrupted
    job is resumed by running the same command again.
    """
    from dflash_batch.jobs._spec import SpecError, load_spec

    try:
        spec = load_spec(job_file, overrides)
        spec.pipeline_argv()  # refuses a runner that does not run on this machine
    except SpecError as e:
        raise click.ClickException(str(e)) from None
    from dflash_batch.pipeline import JobRefused, build

    with tempfile.TemporaryDirectory(prefix="dflash-batch-progress-") as progress_dir:
        try:
            job = build(spec.pipeline_argv(progress_dir))
        except JobRefused as e:
            raise click.ClickException(f"job {spec.name} refused before any work started: {e}") from None
        pre = job.preflight
        click.echo(f"job {spec.name}: {pre.rows_in} rows in {len(pre.files)} file(s) -> {spec.output}", err=True)
        if pre.previous_completions:
            click.echo(f"  resuming: {len(pre.previous_completions)} completion file(s) there already; "
                       "their ids are skipped", err=True)
        click.echo(f"  model {spec.model.target}, mode {spec.decode.mode}, batch {spec.decode.batch_size}, "
                   f"runner direct ({spec.runner.direct_running_mode}, {spec.runner.direct_num_workers} worker(s))",
                   err=True)
        if pre.plan is not None:
            from dflash_batch.pipeline._model import describe_devices

            click.echo(f"  mesh {describe_devices()}, data {pre.plan.data} x model {pre.plan.model}; "
                       f"{pre.plan.total / 1e9:.2f} GB per device planned", err=True)
        try:
            from dflash_batch.jobs._ledger import ledger_entry

            with ledger_entry(spec, runner="direct", output=spec.output):
                result = run_with_progress(job, progress_dir, show=not no_progress)
        except KeyboardInterrupt:
            raise click.ClickException("interrupted; run the same command again to resume "
                                       "(rows already completed are skipped)") from None
    click.echo(format_summary(result.stats))
