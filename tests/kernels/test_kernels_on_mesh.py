"""Runs tests/kernels/mesh in its own pytest process with 8 simulated CPU devices."""

from __future__ import annotations

from pathlib import Path

from mesh_runner import run_mesh_suite


def test_kernels_under_shard_map_on_8_simulated_devices():
    result = run_mesh_suite(Path(__file__).parent / "mesh", 8)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
