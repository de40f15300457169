"""Mesh tests need simulated devices, which must exist before jax starts: they run in their own
pytest process (``tests/test_simulated_devices.py`` starts it). Any other
pytest process skips collecting them."""

from __future__ import annotations

import os

MESH_DEVICES = 8
FLAG = f"--xla_force_host_platform_device_count={MESH_DEVICES}"

if FLAG not in os.environ.get("XLA_FLAGS", ""):
    collect_ignore_glob = ["test_*.py"]
