"""``dflash-batch submit JOB.toml [--set ...] [--dry-run]``: the job on Dataflow with TPU workers.

The spec's ``[runner]`` table names the Dataflow settings (project, region, zone, temp_location,
staging_location, tpu_type, tpu_topology, machine_type, sdk_container_image, disk_size_gb,
max_workers). ``submit`` always means Dataflow (``runner.name`` is forced to ``dataflow``), and
refuses, before any work and with exit status 2, a spec whose settings cannot run there:

- the TPU type, topology and machine type must be a row of ``TPU_MACHINE_TYPES`` (DESIGN section
  5); a mismatch names ``runner.machine_type`` and the one machine type that fits;
- input, output, temp_location and staging_location must be ``gs://``: workers cannot see this
  machine's disk;
- model.target and model.drafter must be ``gs://`` or a name the worker resolves from the
  package baked into the container (a registered model name; drafter ``default`` or ``none``).
  A local folder is refused, for the same reason.

Dry run. Beam's own ``--dry_run`` stops after ``apiclient.Job`` is built, whose request holds
only a name and a type: the environment (worker pool, machine type, service options, container
image, experiments) is added by ``DataflowApplicationClient.create_job_description``, which
first uploads the pipeline proto and the staged packages. ``dry_run_request`` runs that very
method of Beam's, on a client whose one upload method records what would be staged instead of
uploading (``_OfflineClient.stage_file_with_retry``); clients are built with ``no_auth``, so
nothing needs credentials or the network. The request it writes is the ``CreateJobRequest``
the real submission would send, except for the staged file contents.
"""

from __future__ import annotations

import dataclasses

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import click

from dflash_batch.jobs._exit import Refused

# (tpu_type, topology) -> the only worker machine type with that slice (DESIGN section 5).
TPU_MACHINE_TYPES: dict[tuple[str, str], str] = {
    ("tpu-v5-lite-podslice", "1x1"): "ct5lp-hightpu-1t",
    ("tpu-v5-lite-podslice", "2x2"): "ct5lp-hightpu-4t",
    ("tpu-v5-lite-podslice", "2x4"): "ct5lp-hightpu-8t",
    ("tpu-v6e-slice", "1x1"): "ct6e-standard-1t",
    ("tpu-v6e-slice", "2x2"): "ct6e-standard-4t",
    ("tpu-v6e-slice", "2x4"): "ct6e-standard-8t",
    ("tpu-v5p-slice", "2x2x1"): "ct5p-hightpu-4t",
}
# TPU type -> chip generation, for HBM per chip (decoder.HBM_PER_CHIP).
TPU_CHIPS = {"tpu-v5-lite-podslice": "v5e", "tpu-v6e-slice": "v6e", "tpu-v5p-slice": "v5p"}
HARNESS_THREADS = 2  # one process drives the chip; a few threads keep reads and writes moving


class SubmitRefused(ValueError):
    """A spec that must not be submitted; ``problems`` each name their field."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def check_dataflow(spec) -> list[str]:
    """The problems (each naming its spec field) that stop ``spec`` from running on Dataflow TPUs."""
    r = spec.runner
    problems = []
    for key in ("tpu_type", "tpu_topology", "machine_type", "sdk_container_image", "temp_location"):
        if getattr(r, key) is None:
            problems.append(f"runner.{key} is required for a Dataflow job")
    if r.tpu_type is not None and r.tpu_topology is not None:
        allowed = TPU_MACHINE_TYPES.get((r.tpu_type, r.tpu_topology))
        if allowed is None:
            rows = ", ".join(f"{t} {s}" for t, s in TPU_MACHINE_TYPES)
            problems.append(f"runner.tpu_type/runner.tpu_topology {r.tpu_type!r} {r.tpu_topology!r} is not a "
                            f"supported TPU slice (one of: {rows})")
        elif r.machine_type is not None and r.machine_type != allowed:
            problems.append(f"runner.machine_type must be {allowed!r} for {r.tpu_type} {r.tpu_topology}, "
                            f"got {r.machine_type!r}")
    for field, value in (("input", spec.input), ("output", spec.output), ("runner.temp_location", r.temp_location),
                         ("runner.staging_location", r.staging_location)):
        if value is not None and not value.startswith("gs://"):
            problems.append(f"{field} must be a gs:// location for a Dataflow job (workers cannot read this "
                            f"machine's disk), got {value!r}")
    problems += _model_problems(spec)
    if r.sdk_container_image is not None and not re.fullmatch(r"[^\s:]+(:[^\s:]+)?(@sha256:[0-9a-f]+)?",
                                                              r.sdk_container_image):
        problems.append(f"runner.sdk_container_image must be an image reference, got {r.sdk_container_image!r}")
    return problems


def tpu_plan(spec):
    """The job's mesh layout and memory plan on one worker of its TPU type and topology;
    SubmitRefused naming the setting to change when it cannot fit. None when the model's
    config.json cannot be read from this machine (a gs:// model, offline)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from dflash_batch.decoder import DRAFTER_MODES, HBM_PER_CHIP, chip_count
    from dflash_batch.pipeline import JobRefused, check_layout, job_config, model_configs

    r = spec.runner
    drafter = spec.model.drafter if spec.decode.mode in DRAFTER_MODES else None
    config = dataclasses.replace(job_config(spec, PipelineOptions([])), drafter=drafter)
    try:
        model_configs(spec.model.target, drafter, spec.decode.mode)
    except Exception:  # noqa: BLE001 - e.g. a gs:// model with no credentials or network here
        return None
    chip = TPU_CHIPS[r.tpu_type]
    try:
        return check_layout(config, chip_count(r.tpu_topology), HBM_PER_CHIP[chip],
                            where=f"{r.tpu_type} {r.tpu_topology} ({chip_count(r.tpu_topology)} {chip} chips)",
                            topology_field="runner.tpu_topology")
    except JobRefused as e:
        raise SubmitRefused([str(e)]) from None


def _model_problems(spec) -> list[str]:
    from dflash_batch.decoder import DRAFTER_MODES, registered_models

    problems = []
    target = spec.model.target
    if not (target.startswith("gs://") or target in registered_models()):
        problems.append(f"model.target must be a gs:// prefix or a registered name ({', '.join(registered_models())}) "
                        f"for a Dataflow job, got {target!r}")
    drafter = spec.model.drafter
    if spec.decode.mode in DRAFTER_MODES and not (drafter.startswith("gs://") or drafter in ("default", "none")):
        problems.append(f"model.drafter must be a gs:// prefix, 'default' or 'none' for a Dataflow job, "
                        f"got {drafter!r}")
    return problems


def job_name(spec) -> str:
    """A Dataflow job name (lower-case letters, digits, '-') from the spec's name."""
    name = re.sub(r"[^a-z0-9-]+", "-", spec.name.lower()).strip("-") or "job"
    if not name[0].isalpha():
        name = f"dflash-{name}"
    return name[:63].rstrip("-")


def dataflow_flags(spec, name: str | None = None) -> list[str]:
    """Beam's DataflowRunner flags for ``spec``'s [runner] (checked first); see ``JobSpec.beam_options``."""
    if problems := check_dataflow(spec):
        raise SubmitRefused(problems)
    r = spec.runner
    argv = [
        "--runner=DataflowRunner",
        f"--project={r.project}",
        f"--region={r.region}",
        f"--job_name={name or job_name(spec)}",
        f"--temp_location={r.temp_location}",
        f"--staging_location={r.staging_location or r.temp_location.rstrip('/') + '/staging'}",
        f"--dataflow_service_options=worker_accelerator=type:{r.tpu_type};topology:{r.tpu_topology}",
        f"--worker_machine_type={r.machine_type}",
        f"--sdk_container_image={r.sdk_container_image}",
        "--experiments=use_runner_v2",
        "--experiments=no_use_multiple_sdk_containers",
        f"--number_of_worker_harness_threads={HARNESS_THREADS}",
        "--sdk_location=container",  # the image already holds Beam; nothing to stage for it
    ]
    if r.zone:
        argv.append(f"--worker_zone={r.zone}")
    if r.disk_size_gb:
        argv.append(f"--disk_size_gb={r.disk_size_gb}")
    if r.max_workers:
        argv.append(f"--max_num_workers={r.max_workers}")
    return argv


# ---- the dry run --------------------------------------------------------------------------------

def _offline_preflight(config):
    """Stands in for ``build``'s preflight in a dry run, which must not list gs:// inputs or
    read the model's config over the network."""
    from dflash_batch.decoder import DRAFTER_MODES
    from dflash_batch.pipeline import Preflight, result_manifest
    from dflash_batch.schemas import COMPLETIONS_SCHEMA, PROMPTS_SCHEMA

    spec = config.spec
    drafter = spec.model.drafter if spec.decode.mode in DRAFTER_MODES else None
    return Preflight(files=(config.input,), input_schema=PROMPTS_SCHEMA, rows_in=0,
                     completions_schema=COMPLETIONS_SCHEMA, previous_completions=(),
                     drafter=drafter, manifest=result_manifest(config))


def _offline_client_class():
    from apache_beam.runners.dataflow.internal.apiclient import DataflowApplicationClient

    class _OfflineClient(DataflowApplicationClient):
        """Beam's client whose uploads are recorded, not made."""

        staged: list[dict[str, Any]]

        def stage_file_with_retry(self, gcs_or_local_path, file_name, stream_or_path, mime_type=None,
                                  total_size=None):
            if isinstance(stream_or_path, str):
                size = os.path.getsize(stream_or_path)
            else:
                size = len(stream_or_path.getvalue())
            self.staged.append({"location": gcs_or_local_path.rstrip("/") + "/" + file_name, "bytes": size})

    return _OfflineClient


def dry_run_request(spec) -> dict[str, Any]:
    """The complete Dataflow ``CreateJobRequest`` (as JSON) for the Dataflow job ``spec``, offline.

    Builds the job's pipeline, lets the DataflowRunner translate it with ``--dry_run``, then runs
    Beam's ``create_job_description`` with uploads recorded instead of made.
    """
    from apache_beam.options.pipeline_options import GoogleCloudOptions
    from google.protobuf import json_format

    from dflash_batch.pipeline import build

    job = build(spec, beam_options=("--dry_run=True", "--no_auth"), check=_offline_preflight)
    result = job.pipeline.run()  # DataflowRunner with dry_run: translation only, no request
    df_job = result.job
    client = _offline_client_class()(df_job.options, df_job.root_staging_location)
    client.staged = []
    client.create_job_description(df_job)
    gco = df_job.options.view_as(GoogleCloudOptions)
    body = json.loads(json_format.MessageToJson(df_job.proto._pb))
    steps = _step_names(df_job.proto_pipeline)
    return {"project_id": gco.project, "location": gco.region, "job": body,
            "pipeline_step_names": steps, "staged_files": client.staged,
            "note": "dflash-batch submit --dry-run: the CreateJobRequest Beam would send; nothing was uploaded"}


def _step_names(proto_pipeline) -> list[str]:
    """The user-facing labels of the pipeline's top-level transforms (ReadPrompts, Decode, ...)."""
    comps = proto_pipeline.components.transforms
    names = []
    for root in proto_pipeline.root_transform_ids:
        for sub in comps[root].subtransforms or [root]:
            names.append(comps[sub].unique_name)
    return names


# ---- the command --------------------------------------------------------------------------------

def _refuse(message: str) -> None:
    raise Refused(message)


@click.command("submit")
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a spec value, e.g. --set runner.max_workers=4 (repeatable).")
@click.option("--dry-run", is_flag=True,
              help="Write the complete Dataflow job request to a JSON file instead of submitting (offline).")
@click.option("--request-file", type=click.Path(path_type=Path), default=None,
              help="Where --dry-run writes the request (default: ./NAME.dataflow-request.json).")
def submit_command(job_file: Path, overrides: tuple[str, ...], dry_run: bool, request_file: Path | None) -> None:
    """Submit the job spec JOB_FILE (TOML) to Dataflow with TPU workers.

    Refused specs (TPU/machine type mismatch, local paths, missing settings) exit with status 2
    before any work starts.
    """
    from dflash_batch.jobs._spec import SpecError, load_spec

    try:
        spec = load_spec(job_file, ("runner.name=dataflow", *overrides))
    except SpecError as e:
        _refuse(str(e))
    problems = check_dataflow(spec)
    if problems:
        _refuse(str(SpecError(problems, source=str(job_file))))
    try:
        plan = tpu_plan(spec)
    except SubmitRefused as e:
        _refuse(str(SpecError(e.problems, source=str(job_file))))
    if dry_run:
        where = f"{spec.runner.tpu_type} {spec.runner.tpu_topology}"
        if plan is None:
            click.echo(f"memory plan on {where}: skipped (the model's config.json is not readable from here)")
        else:
            click.echo(f"memory plan on {where}:\n" + "\n".join(f"  {line}" for line in plan.lines()))
    if dry_run:
        request = dry_run_request(spec)
        path = request_file or Path(f"{spec.name}.dataflow-request.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(request, indent=2, sort_keys=True), encoding="utf-8")
        click.echo(f"dry run: the Dataflow job request for {spec.name} ({spec.runner.tpu_type} "
                   f"{spec.runner.tpu_topology} on {spec.runner.machine_type}) is in {path.resolve()}")
        return
    _submit(spec)


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

