"""The Dataflow TPU worker Dockerfile has the pieces a worker needs (parsed; no Docker here)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import os
import subprocess
import sys

import apache_beam
import pytest

from dflash_batch.jobs._dataflow import TPU_MACHINE_TYPES
from dflash_batch.jobs.tpu_env import DOCUMENTED, tpu_env

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


def test_the_base_image_is_beams_sdk_at_our_version():
    ins = instructions()
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    base = next(a for k, a in ins if k == "FROM").replace("${BEAM_VERSION}", args["BEAM_VERSION"])
    assert base == f"apache/beam_python3.11_sdk:{apache_beam.version.__version__}"


def test_it_installs_jax_tpu_pinned_with_libtpu_and_this_package():
    ins = instructions()
    runs = " ".join(a for k, a in ins if k == "RUN")
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    assert '"jax[tpu]==${JAX_VERSION}"' in runs and "libtpu_releases" in runs  # the extra pins libtpu
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["JAX_VERSION"])
    assert "pip install --no-cache-dir /opt/dflash_batch/src" in runs
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


def test_an_unknown_machine_starts_boot_without_tpu_env(tmp_path):
    env = {**os.environ, "DFLASH_TPU_MACHINE_TYPE": "n1-standard-4", "BEAM_BOOT": "env"}
    result = subprocess.run(["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, check=True)
    assert "TPU_ACCELERATOR_TYPE=" not in result.stdout and "no TPU environment" in result.stderr
