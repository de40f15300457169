"""What a job needs to run on Dataflow with TPU workers: the slice tables, the checks, the memory
plan and Beam's flags (the ``submit`` command is ``_submit``).

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
  A local folder is refused, for the same reason;
- this machine's Python minor version and Beam version must equal the worker image's
  (``_image_versions``): Dataflow runs what this machine pickled.

Memory. Before anything is built, ``tpu_plan`` plans the job on one worker of its slice from
config.json files read offline (``_plan_configs``: a local copy, or the shapes of known models);
a job that cannot fit is refused naming the setting, and one that cannot be planned is refused
too unless ``--no-memory-check`` says so (printed).

Dry run. ``--dry-run`` writes the ``CreateJobRequest`` the real submit would send, made offline
by Beam's own code (``_dataflow_request``), and its extras (step names, staged files) beside it.
"""

from __future__ import annotations

import re
from typing import Sequence


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
    """(the job's mesh layout and memory plan on one worker of its TPU slice, where its configs came from).

    Offline: the configs come from ``_plan_configs`` (a local copy or the known shapes), never from
    gs://. Raises ``PlanUnavailable`` when no config is at hand, and ``SubmitRefused`` naming the
    setting to change when the job cannot fit the slice. Every call into the planner is here.
    """
    from dflash_batch.decoder import DRAFTER_MODES, HBM_PER_CHIP, DrafterConfig, LayoutError, TargetConfig, \
        chip_count
    from dflash_batch.jobs._plan_configs import PlanUnavailable, plan_configs
    from dflash_batch.pipeline import LAYOUT_FIELDS, ModelKey, job_dtype, layout

    r = spec.runner
    configs = plan_configs(spec)
    try:
        tcfg = TargetConfig.from_hf(configs.target)
        dcfg = None if configs.drafter is None else DrafterConfig.from_hf(configs.drafter)
        if dcfg is not None:
            dcfg.check_target(tcfg)
    except (ValueError, KeyError, TypeError) as e:
        raise PlanUnavailable(f"the config from {configs.drafter_source or configs.target_source} cannot be "
                              f"planned: {type(e).__name__}: {e}") from None
    drafter = spec.model.drafter if spec.decode.mode in DRAFTER_MODES else None
    chips, chip = chip_count(r.tpu_topology), TPU_CHIPS[r.tpu_type]
    try:
        key = ModelKey(spec.model.target, drafter, spec.decode, dtype=job_dtype(spec, configs.target))
        plan = layout(key, chips, HBM_PER_CHIP[chip],
                      where=f"{r.tpu_type} {r.tpu_topology} ({chips} {chip} chips)", tcfg=tcfg, dcfg=dcfg)
    except LayoutError as e:
        raise SubmitRefused([f"{LAYOUT_FIELDS.get(e.setting, 'runner.tpu_topology')}: {e}"]) from None
    return plan, configs


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
