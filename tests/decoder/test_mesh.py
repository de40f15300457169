"""Runs tests/decoder/mesh in its own pytest process with 8 simulated CPU devices (the device
count is fixed when jax starts, and this process has one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MESH_TESTS = Path(__file__).parent / "mesh"


def run_mesh_suite(folder: Path, devices: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder), *args],
                          env=env, capture_output=True, text=True, cwd=Path(__file__).parents[2])


def test_decoding_on_meshes_of_8_simulated_devices():
    result = run_mesh_suite(MESH_TESTS, 8)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
