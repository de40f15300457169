"""The suites that need 8 simulated CPU devices, in ONE pytest process: the device count is fixed
when jax starts, and the main test process has one device. One process for both folders starts
jax, pytest and the tiny checkpoints once. (The 6-device demo job runs from tests/jobs/test_mesh_job.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from mesh_runner import run_mesh_suite

HERE = Path(__file__).parent


@pytest.mark.slow  # minutes: every decode mode compiled on several meshes
@pytest.mark.minutes
def test_decoding_and_kernels_on_meshes_of_8_simulated_devices():
    result = run_mesh_suite([HERE / "decoder" / "mesh", HERE / "kernels" / "mesh"], 8)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
    # Both folders ran: a collection that silently dropped one would still pass.
    assert "test_mesh_decoding.py" in result.stdout and "test_kernels_under_shard_map.py" in result.stdout, \
        result.stdout[-2000:]
