"""Our kernels are ``dflash_batch.kernels``; the top-level name ``kernels`` stays the installed
package's, which transformers imports (tests/test_root_commands.py runs this from the root)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_installed_kernels_package_is_what_transformers_imports():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the `kernels` package is not installed: transformers skips its hub-kernels integration")
    # Where `import kernels` would load from, without importing it (it pulls in torch).
    origin = Path(importlib.util.find_spec("kernels").origin).resolve()
    assert not origin.is_relative_to(ROOT / "kernels"), origin  # not our folder (a venv may sit inside ROOT)
