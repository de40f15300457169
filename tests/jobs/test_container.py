"""The Dataflow TPU worker Dockerfile has the pieces a worker needs (parsed; no Docker here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import apache_beam

DOCKERFILE = Path(__file__).parents[2] / "jobs" / "container" / "Dockerfile"


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


def test_it_installs_jax_tpu_and_this_package():
    runs = " ".join(a for k, a in instructions() if k == "RUN")
    assert '"jax[tpu]"' in runs and "libtpu_releases" in runs
    assert "pip install --no-cache-dir /opt/dflash_batch/src" in runs
    assert any(k == "COPY" and a.startswith(". /opt/dflash_batch/src") for k, a in instructions())


def test_it_keeps_beams_boot_entrypoint_and_sets_single_host_tpu_env():
    ins = instructions()
    assert json.loads(next(a for k, a in ins if k == "ENTRYPOINT")) == ["/opt/apache/beam/boot"]
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for k, a in ins if k == "ENV")))
    assert env["TPU_HOST_BOUNDS"] == "1,1,1" and env["TPU_WORKER_ID"] == "0"
    assert env["TPU_WORKER_HOSTNAMES"] == "localhost" and env["TPU_SKIP_MDS_QUERY"] == "1"
    assert env["TPU_CHIPS_PER_HOST_BOUNDS"] == "${TPU_CHIPS_PER_HOST_BOUNDS}"
