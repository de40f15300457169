"""Starts a folder of mesh tests in its own pytest process with simulated CPU devices: the
device count is fixed when jax starts, and the main test process has one device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_mesh_suite(folder: Path, devices: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder), *args],
                          env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1])
