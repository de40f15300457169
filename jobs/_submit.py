"""``dflash-batch submit JOB.toml [--set ...] [--dry-run]``: the job on Dataflow with TPU workers.

What is refused and why, the memory plan and the dry run: ``_dataflow``'s docstring.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from dflash_batch.jobs._dataflow import SubmitRefused, check_dataflow, tpu_plan
from dflash_batch.jobs._exit import Refused
from dflash_batch.jobs._spec import SpecError, load_spec


def _refuse(message: str) -> None:
    raise Refused(message)


def _plan_lines(spec, no_memory_check: bool) -> list[str]:
    """The memory plan as printed; refuses (exit 2) a job that cannot fit, or cannot be planned
    unless ``no_memory_check``. Never reads the network (see ``_plan_configs``)."""
    from dflash_batch.jobs._plan_configs import PlanUnavailable

    where = f"{spec.runner.tpu_type} {spec.runner.tpu_topology}"
    if no_memory_check:
        return [f"memory plan on {where}: SKIPPED (--no-memory-check): nothing checks that the job fits the slice"]
    try:
        plan, configs = tpu_plan(spec)
    except SubmitRefused as e:
        _refuse(str(SpecError(e.problems, source="the job")))
    except PlanUnavailable as e:
        _refuse(f"the job's memory plan cannot be made offline: {e}")
    sources = [f"target config: {configs.target_source}"]
    if configs.drafter_source:
        sources.append(f"drafter config: {configs.drafter_source}")
    return [f"memory plan on {where}:", *(f"  {line}" for line in [*sources, *plan.lines()])]


@click.command("submit")
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a spec value, e.g. --set runner.max_workers=4 (repeatable).")
@click.option("--dry-run", is_flag=True,
              help="Write the Dataflow CreateJobRequest to a JSON file instead of sending it (offline, no credentials).")
@click.option("--request-file", type=click.Path(path_type=Path), default=None,
              help="Where --dry-run writes the request (default: ./NAME.dataflow-request.json); the step names "
                   "and staged files go beside it, in NAME.dataflow-request.extras.json.")
@click.option("--model-config", type=str, default=None, metavar="PATH",
              help="A local copy of the gs:// target's config.json (or a known model's name) to plan memory with; "
                   "the same as --set model.config=PATH.")
@click.option("--drafter-config", type=str, default=None, metavar="PATH",
              help="The same for a gs:// drafter (--set model.drafter_config=PATH).")
@click.option("--no-memory-check", is_flag=True,
              help="Submit without the memory plan (nothing then checks that the job fits the TPU slice).")
def submit_command(job_file: Path, overrides: tuple[str, ...], dry_run: bool, request_file: Path | None,
                   model_config: str | None, drafter_config: str | None, no_memory_check: bool) -> None:
    """Submit the job spec JOB_FILE (TOML) to Dataflow with TPU workers.

    Refused before any work starts, with exit status 2 and the setting named: a TPU/machine
    type mismatch, local paths, missing settings, a Python or Beam version other than the
    worker image's, a job that does not fit the slice's memory, and one whose memory plan cannot
    be made from here (give --model-config, or --no-memory-check).
    """
    from dflash_batch.jobs._image_versions import version_problems

    extra = [f"model.config={json.dumps(model_config)}"] if model_config else []
    extra += [f"model.drafter_config={json.dumps(drafter_config)}"] if drafter_config else []
    try:
        spec = load_spec(job_file, ("runner.name=dataflow", *overrides, *extra))
    except SpecError as e:
        _refuse(str(e))
    problems = check_dataflow(spec)
    if not problems:
        problems = version_problems(spec.runner.sdk_container_image)
    if problems:
        _refuse(str(SpecError(problems, source=str(job_file))))
    click.echo("\n".join(_plan_lines(spec, no_memory_check)))
    if dry_run:
        _write_request(spec, request_file)
        return
    _submit(spec)


def _write_request(spec, request_file: Path | None) -> None:
    from dflash_batch.jobs._dataflow_request import job_request, request_json

    request, extras = job_request(spec)
    path = request_file or Path(f"{spec.name}.dataflow-request.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(request_json(request) + "\n", encoding="utf-8")
    extras_path = path.with_name(path.name.removesuffix(".json") + ".extras.json")
    extras["note"] = (f"{path.name} is the CreateJobRequest that `dflash-batch submit` sends for {spec.name}, "
                      "with the same options; nothing was uploaded or sent. Its staging folder's timestamp differs "
                      "per submission, and the staged pipeline lists the input files found at submission.")
    extras_path.write_text(json.dumps(extras, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    click.echo(f"dry run: the Dataflow job request for {spec.name} ({spec.runner.tpu_type} "
               f"{spec.runner.tpu_topology} on {spec.runner.machine_type}) is in {path.resolve()}; "
               f"step names and staged files in {extras_path.name}")


def _submit(spec) -> None:
    from dflash_batch.jobs._ledger import ledger_entry
    from dflash_batch.pipeline import JobRefused, build

    try:
        job = build(spec)
    except JobRefused as e:
        _refuse(f"job {spec.name} refused before any work started: {e}")
    with ledger_entry(spec, runner="dataflow", output=spec.output, wait=False, job_id=job.job_id) as entry:
        job.prepare_output()
        result = job.pipeline.run()
        dataflow_id = result.job_id() if hasattr(result, "job_id") else None
        entry.set(dataflow_job_id=dataflow_id)
    region = spec.runner.region
    click.echo(f"submitted {job.job_id} as Dataflow job {dataflow_id}: https://console.cloud.google.com/dataflow/"
               f"jobs/{region}/{dataflow_id}?project={spec.runner.project}")
