"""Starts folders of mesh tests in their own pytest process with simulated CPU devices: the
device count is fixed when jax starts, and the main test process has one device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from xla_test_flags import xla_flags


def run_mesh_suite(folders: Path | list[Path], devices: int, *args: str) -> subprocess.CompletedProcess:
    """Runs the tests of ``folders`` (one or several) in one pytest process with ``devices``
    simulated devices; each test's outcome is listed (``-rA``) so callers can check what ran."""
    folders = [folders] if isinstance(folders, Path) else folders
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           *map(str, folders), *args],
                          env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1])
