"""Runs tests/jobs/mesh (the demo job as data 2 x model 3) in its own process with 6 simulated devices."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh_runner import run_mesh_suite


@pytest.mark.slow
@pytest.mark.minutes
def test_the_demo_job_on_6_simulated_devices():
    result = run_mesh_suite(Path(__file__).parent / "mesh", 6)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
