"""``dflash-batch run JOB.toml [--set section.key=value ...]``: a job on this machine, with progress.

The spec is validated and the job checked (input files, schemas, model, output) before anything
runs; a refusal names the field to fix and exits 2. While the job runs, a progress bar shows its
phase (loading the model, compiling a bucket, decoding), rows done out of rows in, completion
tokens/s over the last seconds of decoding, and tau; at the end a summary says what the run did
and where everything went. A run that fails exits 1; running it again resumes it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import click

from dflash_batch.jobs._exit import Refused
from dflash_batch.pipeline import Figures, format_seconds, rate_line, time_line
from dflash_batch.schemas import tau_from_histogram


def dead_letter_kinds(output: str) -> tuple[dict[str, int], dict[str, str]]:
    """The output's dead letters per kind (each counted once, see ``pipeline.read_outcomes``), and
    one error text per kind as an example; empty when the output cannot be read."""
    from dflash_batch.pipeline import read_outcomes

    try:
        outcomes = read_outcomes(output)
    except Exception:  # noqa: BLE001 - the summary must not fail over a listing
        return {}, {}
    return outcomes.dead_by_kind(), outcomes.dead_examples()


def reason_lines(kinds: dict[str, int], examples: dict[str, str] | None = None, limit: int = 5) -> list[str]:
    """'dead letter x3 KIND: EXAMPLE' for the ``limit`` most common kinds, then what was left out."""
    examples = examples or {}
    ranked = sorted(kinds.items(), key=lambda kv: -kv[1])
    lines = [f"dead letter x{n} {kind}" + (f": e.g. {examples[kind]}" if kind in examples else "")
             for kind, n in ranked[:limit]]
    rest = ranked[limit:]
    if rest:
        lines.append(f"and {sum(n for _, n in rest)} more dead letter(s) of {len(rest)} other kind(s) "
                     "(see dead_letters-*.parquet)")
    return lines


def _workers_line(run: dict[str, Any]) -> str:
    loads, workers = run.get("model_loads") or 0, len(run.get("workers") or [])
    if not workers:
        return "no model loaded: nothing to decode"
    hardware = ", ".join(run.get("hardware") or []) or "unknown hardware"
    return f"{loads} model load(s), {workers} worker process(es), on {hardware}"


def format_summary(stats: dict[str, Any], examples: dict[str, str] | None = None) -> str:
    """A human summary of a job-stats record: this run, then the job over all its runs."""
    files = stats.get("files", {})
    run = stats.get("this_run") or {}
    this = Figures.from_dict(run)
    runs = stats.get("runs") or []
    waste = ", ".join(f"{b}: {w:.0%}" for b, w in json.loads(stats.get("padding_waste_json") or "{}").items())
    finish = ", ".join(f"{r} x{n}" for r, n in sorted((run.get("finish_reasons") or {}).items()))
    done_before, this_run = stats.get("skipped_completed") or 0, stats.get("completions_this_run") or 0
    dead = stats.get("dead_letters") or 0
    tau = tau_from_histogram(run.get("tau_histogram") or [])
    rows = (f"  rows:     {stats.get('rows_in')} in -> {stats.get('completions_out')} completions "
            f"({this_run} this run, {done_before} done earlier), {dead} dead letters")
    if len(runs) > 1 and stats.get("rows_in_this_run") not in (None, stats.get("rows_in")):
        rows += f" (this run read {stats['rows_in_this_run']} of the {stats.get('rows_in')} rows in)"
    if this_run == 0 and done_before:
        lines = [f"job {stats.get('job_id')}: nothing left to do: {done_before} of {done_before} ids already complete",
                 rows, f"  time:     wall {format_seconds(this.wall_seconds)}; {_workers_line(run)}"]
    else:
        lines = [
            f"job {stats.get('job_id')} finished in {format_seconds(this.wall_seconds)}",
            rows,
            f"  tokens:   {this.prompt_tokens} prompt, {this.completion_tokens} completion this run",
            f"  decode:   mode {stats.get('mode')}, dtype {stats.get('dtype')}, batch {stats.get('batch_size')}, "
            f"block {stats.get('block_size')}, "
            + (f"tau {tau:.2f} (tokens per target step, bonus token included)" if tau is not None
               else "nothing decoded this run"),
            f"  time:     {time_line(this)}",
            f"  tokens/s: {rate_line(this)}",
            f"  workers:  {_workers_line(run)}",
        ]
    if len(runs) > 1:
        job = Figures.from_dict(stats)
        lines += [f"  job, over its {len(runs)} runs:",
                  f"    time:     {time_line(job)}",
                  f"    tokens/s: {rate_line(job)}"]
    if finish:
        lines.append(f"  finish:   {finish}")
    if waste and this_run:
        lines.append(f"  padding:  {waste} of padded prompt positions, by bucket")
    dead_files = files.get("dead_letters") or []
    if dead:
        kinds = stats.get("dead_letters_by_kind") or {}
        if examples is None:
            kinds, examples = dead_letter_kinds(stats.get("output") or "")
        lines += [f"  {line}" for line in reason_lines(kinds, examples)]
    lines.append(f"output: {stats.get('output')}")
    lines += _file_lines("completions: ", files.get("completions") or [], f"{stats.get('output')}/completions-*.parquet")
    lines += _file_lines("dead letters:", dead_files, f"{stats.get('output')}/dead_letters-*.parquet")
    lines.append(f"  job stats:    {stats.get('output')}/job_stats.json")
    return "\n".join(lines)


def _file_lines(label: str, paths: list[str], pattern: str, limit: int = 3) -> list[str]:
    """One line per file, or one line for them all when there are more than ``limit`` (parts)."""
    if len(paths) <= limit:
        return [f"  {label} {p}" for p in paths]
    return [f"  {label} {len(paths)} files, {pattern}"]


def _bar_text(p) -> str:
    rate = p.moving_rate()
    tau = f"{p.tau:.2f}" if p.tau is not None else "-"
    return f"{'-' if rate is None else f'{rate:.1f}'} tok/s, tau {tau}, {p['dead_letters']} dead"


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
    thread.start()
    name = job.config.spec.name
    bar = tqdm(total=job.preflight.rows_in, unit="row", desc=f"{name}: starting", disable=not show,
               dynamic_ncols=True)
    try:
        while thread.is_alive():
            thread.join(0.5)
            p = read_progress(progress_dir)
            bar.n = p["rows"] + p["dead_letters"] + p["skipped"]
            phase = p.phase_text() if bar.n < bar.total else "writing output"
            bar.set_description_str(f"{name}: {phase if thread.is_alive() else 'done'}", refresh=False)
            bar.set_postfix_str(_bar_text(p), refresh=True)
    finally:
        bar.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def kept_line(output: str) -> str:
    """What an output holds now, for a run that stopped: 'kept N completions and M dead letters in OUTPUT'."""
    from dflash_batch.pipeline import read_outcomes

    try:
        o = read_outcomes(output)
    except Exception as e:  # noqa: BLE001 - the message must come out even if the output is unreadable
        return f"what was kept in {output} could not be read ({type(e).__name__}: {e})"
    return (f"kept {len(o.completed)} completion(s) and {len(o.dead)} dead letter(s) in {output} "
            f"({len(o.completion_files)} completion file(s))")


def _completed_ids(output: str) -> int:
    from dflash_batch.pipeline import read_outcomes

    return len(read_outcomes(output).completed)


@click.command("run")
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a spec value, e.g. --set decode.batch_size=4 (repeatable).")
@click.option("--no-progress", is_flag=True, help="Do not draw the progress bar.")
def run_command(job_file: Path, overrides: tuple[str, ...], no_progress: bool) -> None:
    """Run the job spec JOB_FILE (TOML) on this machine, on Beam's FnApiRunner (the local runner
    behind Beam's DirectRunner).

    A rerun into the same output skips rows that already have completions, so an interrupted
    job is resumed by running the same command again. Exit status: 2 when the spec is refused
    (nothing ran), 1 when the run failed.
    """
    from dflash_batch.jobs._spec import SpecError, load_spec

    try:
        spec = load_spec(job_file, overrides).require_direct()
    except SpecError as e:
        raise Refused(str(e)) from None
    from dflash_batch.pipeline import JobRefused, build

    with tempfile.TemporaryDirectory(prefix="dflash-batch-progress-") as progress_dir:
        try:
            job = build(spec, progress_dir=progress_dir)
        except JobRefused as e:
            raise Refused(f"job {spec.name} refused before any work started: {e}") from None
        pre = job.preflight
        click.echo(f"job {job.job_id}: {pre.rows_in} rows in {len(pre.files)} file(s) -> {spec.output}", err=True)
        if pre.previous_completions:
            click.echo(f"  resuming: {_completed_ids(job.config.output)} ids already complete in "
                       f"{len(pre.previous_completions)} completion file(s) there; they are skipped", err=True)
        dtype = job.config.dtype + (" (auto)" if spec.model.dtype == "auto" else "")
        click.echo(f"  model {spec.model.target} in {dtype}, mode {spec.decode.mode}, batch {spec.decode.batch_size}, "
                   f"runner direct ({spec.runner.direct_running_mode}, {spec.runner.direct_num_workers} worker(s))",
                   err=True)
        if pre.plan is not None:
            from dflash_batch.pipeline import describe_devices

            click.echo(f"  mesh {describe_devices()}, data {pre.plan.data} x model {pre.plan.model}; "
                       f"{pre.plan.total / 1e9:.2f} GB per device planned", err=True)
        from dflash_batch.jobs._ledger import ledger_entry

        try:
            with ledger_entry(spec, runner="direct", output=spec.output, job_id=job.job_id):
                result = run_with_progress(job, progress_dir, show=not no_progress)
        except KeyboardInterrupt:
            from dflash_batch.pipeline import close_writes

            close_writes()  # the job's thread goes on decoding; nothing it saves from now on goes uncounted
            click.echo(f"Error: interrupted; {kept_line(job.config.output)}; run the same command again to "
                       "decode the rest", err=True)
            sys.stderr.flush()
            shutil.rmtree(progress_dir, ignore_errors=True)
            os._exit(1)  # not sys.exit: the job's thread would run on (and crash) while Python shuts down
        except Exception as e:  # noqa: BLE001 - a failed run: exit 1 with the reason, not a traceback
            raise click.ClickException(f"job {job.job_id} failed: {type(e).__name__}: {e}\n"
                                       f"{kept_line(job.config.output)}; run the same command again to decode "
                                       "the rest") from None
    click.echo(format_summary(result.stats))
