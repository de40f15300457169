"""The real job on a mesh needs 6 simulated devices, which must exist before jax starts: it runs
in its own pytest process (``tests/jobs/test_mesh_job.py``); any other process skips it."""

from __future__ import annotations

import os

FLAG = "--xla_force_host_platform_device_count=6"

if FLAG not in os.environ.get("XLA_FLAGS", ""):
    collect_ignore_glob = ["test_*.py"]
