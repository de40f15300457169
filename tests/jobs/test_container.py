"""The Dataflow TPU worker Dockerfile has the pieces a worker needs (parsed; no Docker here)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import os
import subprocess
import sys

import apache_beam
import pyarrow as pa
import pytest

from dflash_batch.jobs._dataflow import TPU_MACHINE_TYPES
from dflash_batch.jobs._image_versions import LABELS, recipe_versions
from dflash_batch.jobs.tpu_env import DOCUMENTED, MACHINES, tpu_env

DOCKERFILE = Path(__file__).parents[2] / "jobs" / "container" / "Dockerfile"
ENTRYPOINT = DOCKERFILE.parent / "entrypoint.sh"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_base_image_is_beams_sdk_at_our_python_and_beam():
    ins = instructions()
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    base = next(a for k, a in ins if k == "FROM")
    base = base.replace("${PYTHON_VERSION}", args["PYTHON_VERSION"]).replace("${BEAM_VERSION}", args["BEAM_VERSION"])
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert base == f"apache/beam_python{python}_sdk:{apache_beam.version.__version__}"
    assert recipe_versions() == {"python": python, "beam": apache_beam.version.__version__,
                                 "jax": args["JAX_VERSION"]}


def test_the_image_records_its_versions_in_labels_and_a_file():
    ins = instructions()
    label = next(a for k, a in ins if k == "LABEL")
    assert {f"{LABELS['python']}=${{PYTHON_VERSION}}", f"{LABELS['beam']}=${{BEAM_VERSION}}"} <= set(label.split())
    assert any("/opt/dflash_batch/image.json" in a for k, a in ins if k == "RUN")
    # ARGs declared before FROM are out of scope after it unless declared again.
    after_from = [a for k, a in ins[[k for k, _ in ins].index("FROM"):] if k == "ARG"]
    assert {"PYTHON_VERSION", "BEAM_VERSION"} <= set(after_from)


def test_every_install_after_jax_is_held_to_its_pin():
    ins = instructions()
    installs = [a for k, a in ins if k == "RUN" and "pip install" in a]
    assert '"jax[tpu]==${JAX_VERSION}"' in installs[0]
    # The jax install appends what it installed (jax, jaxlib, libtpu) to the constraints ...
    assert "pip freeze" in installs[0] and "libtpu" in installs[0] and ">> /opt/dflash_batch/constraints.txt" in installs[0]
    assert ("COPY", "jobs/container/constraints.txt /opt/dflash_batch/constraints.txt") in ins
    # ... and every later install is constrained by them.
    assert installs[1:] and all("-c /opt/dflash_batch/constraints.txt" in a for a in installs[1:])


def test_it_installs_jax_tpu_pinned_with_libtpu_and_this_package():
    ins = instructions()
    runs = " ".join(a for k, a in ins if k == "RUN")
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    assert '"jax[tpu]==${JAX_VERSION}"' in runs and "libtpu_releases" in runs  # the extra pins libtpu
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["JAX_VERSION"])
    assert "pip install --no-cache-dir -c /opt/dflash_batch/constraints.txt /opt/dflash_batch/src" in runs
    assert any(k == "COPY" and a.startswith(". /opt/dflash_batch/src") for k, a in ins)


def test_the_entrypoint_sets_the_tpu_env_then_execs_beams_boot():
    ins = instructions()
    assert json.loads(next(a for k, a in ins if k == "ENTRYPOINT")) == ["/opt/dflash_batch/entrypoint.sh"]
    assert ("COPY", "jobs/container/entrypoint.sh /opt/dflash_batch/entrypoint.sh") in ins
    script = ENTRYPOINT.read_text()
    assert 'BEAM_BOOT="${BEAM_BOOT:-/opt/apache/beam/boot}"' in script and 'exec "$BEAM_BOOT" "$@"' in script
    assert "ALLOW_MULTIPLE_LIBTPU_LOAD" not in DOCKERFILE.read_text().replace(
        "so ALLOW_MULTIPLE_LIBTPU_LOAD is never set", "") + script


def test_googles_documented_v5e_1x1_values_are_what_the_1x1_worker_gets():
    assert tpu_env("ct5lp-hightpu-1t") == DOCUMENTED


# Every slice `submit` accepts -> (TPU_ACCELERATOR_TYPE, TPU_CHIPS_PER_HOST_BOUNDS).
EXPECTED = {
    ("tpu-v5-lite-podslice", "1x1"): ("v5litepod-1", "1,1,1"),
    ("tpu-v5-lite-podslice", "2x2"): ("v5litepod-4", "2,2,1"),
    ("tpu-v5-lite-podslice", "2x4"): ("v5litepod-8", "2,4,1"),
    ("tpu-v6e-slice", "1x1"): ("v6e-1", "1,1,1"),
    ("tpu-v6e-slice", "2x2"): ("v6e-4", "2,2,1"),
    ("tpu-v6e-slice", "2x4"): ("v6e-8", "2,4,1"),
    ("tpu-v5p-slice", "2x2x1"): ("v5p-8", "2,2,1"),
}


def test_every_accepted_slice_has_its_tpu_env():
    assert set(EXPECTED) == set(TPU_MACHINE_TYPES)


@pytest.mark.parametrize("slice_", sorted(EXPECTED), ids=lambda s: f"{s[0]}-{s[1]}")
def test_the_entrypoint_exports_the_slices_values(slice_, tmp_path):
    machine = TPU_MACHINE_TYPES[slice_]
    # The image's python3 has the package installed; here that is the interpreter running the tests.
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "DFLASH_TPU_MACHINE_TYPE": f"projects/1/machineTypes/{machine}",
           "BEAM_BOOT": "env"}
    env.pop("TPU_ACCELERATOR_TYPE", None)
    out = subprocess.run(["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, check=True).stdout
    got = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("TPU_"))
    accelerator, bounds = EXPECTED[slice_]
    assert got == {**DOCUMENTED, "TPU_ACCELERATOR_TYPE": accelerator, "TPU_CHIPS_PER_HOST_BOUNDS": bounds}
    chips = math.prod(int(x) for x in slice_[1].split("x"))
    assert math.prod(int(x) for x in bounds.split(",")) == chips  # the bounds hold every chip of the slice


def _entrypoint(**env) -> subprocess.CompletedProcess:
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
    full = {k: v for k, v in os.environ.items() if k != "DFLASH_TPU_MACHINE_TYPE"}
    return subprocess.run(["sh", str(ENTRYPOINT)], env={**full, "PATH": path, "BEAM_BOOT": "env", **env},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("env, source", [
    ({"DFLASH_TPU_MACHINE_TYPE": "n1-standard-4"}, "from DFLASH_TPU_MACHINE_TYPE (got 'n1-standard-4')"),
    ({"DFLASH_METADATA_URL": "http://127.0.0.1:9/none"}, "from the metadata server (http://127.0.0.1:9/none) (got 'nothing')"),
])
def test_a_worker_without_a_known_machine_type_stops_naming_the_variable(env, source):
    result = _entrypoint(**env)
    assert result.returncode != 0
    assert "TPU_ACCELERATOR_TYPE=" not in result.stdout  # Beam's boot (here `env`) never ran
    assert source in result.stderr
    assert "Set DFLASH_TPU_MACHINE_TYPE to the worker's machine type, one of: " + ", ".join(MACHINES) in result.stderr


def _dataflow_spec(machine: str):
    from dflash_batch.jobs._spec import validate

    runner = {"name": "dataflow", "project": "p", "region": "r", "temp_location": "gs://b/t", "machine_type": machine}
    return validate({"name": "j", "input": "gs://b/in", "output": "gs://b/out", "prompt": {"template": "none"},
                     "runner": runner})


def test_the_decode_step_sets_the_jobs_tpu_variables_before_jax_starts(monkeypatch):
    from apache_beam.options.pipeline_options import PipelineOptions

    from dflash_batch.pipeline import job_config
    from dflash_batch.pipeline._decode import Decode

    environ = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    environ["TPU_WORKER_ID"] = "0"  # set by the entrypoint: kept
    monkeypatch.setattr(os, "environ", environ)
    Decode(job_config(_dataflow_spec("ct5lp-hightpu-8t"), PipelineOptions([])), pa.schema([])).setup()
    assert {k: v for k, v in environ.items() if k.startswith("TPU_")} == tpu_env("ct5lp-hightpu-8t")
    assert environ["TPU_ACCELERATOR_TYPE"] == "v5litepod-8"


def test_a_local_job_sets_no_tpu_variables():
    from dflash_batch.pipeline._worker_env import apply_worker_env

    environ: dict[str, str] = {}
    spec = _dataflow_spec("ct6e-standard-4t")
    assert apply_worker_env(dataclasses.replace(spec, runner=dataclasses.replace(spec.runner, name="direct")),
                            environ) == {}
    assert environ == {}
    assert apply_worker_env(spec, environ) == tpu_env("ct6e-standard-4t") == environ
