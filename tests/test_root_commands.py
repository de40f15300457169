"""The commands people type from the repository root work there.

The root is the package's own folder, so under ``python -m`` / ``python -c`` (which put the
current folder first on the path) its kernels/ would shadow the ``kernels`` package that
transformers imports. These tests run each command the way a contributor or an IDE types it:
from the root, without ``-P`` and without PYTHONSAFEPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROBE = "what_transformers_imports"  # selects tests/kernels/test_kernels_name.py's probe, and only it
CHILD = "DFLASH_BATCH_ROOT_COMMAND_CHILD"  # set in the commands' environment: they never start these tests again

pytestmark = pytest.mark.skipif(CHILD in os.environ, reason="a command started by these tests")


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"} | {CHILD: "1"}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _passed_probe(result: subprocess.CompletedProcess) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "1 passed" in result.stdout, out[-4000:]


@pytest.mark.parametrize("argv", [
    pytest.param([str(BIN / "pytest")], id="pytest"),
    pytest.param([sys.executable, "-m", "pytest"], id="python -m pytest"),
    pytest.param([str(BIN / "pytest"), "tests/kernels"], id="pytest tests/kernels"),
])
@pytest.mark.slow
def test_pytest_from_the_root_runs_the_kernels_name_probe(argv):
    """Collects what the command names (every test, for a bare ``pytest``) and runs the probe,
    which checks where ``import kernels`` resolves: transformers' import of it used to fail."""
    _passed_probe(_run(*argv, "-q", "-p", "no:cacheprovider", "-k", PROBE))


def test_python_c_import_from_the_root_works_and_leaves_transformers_its_kernels():
    result = _run(sys.executable, "-c", "import dflash_batch")
    assert result.returncode == 0, result.stderr[-3000:]
    # Importing the package takes its own folder off the path: what follows finds installed packages.
    code = "import dflash_batch, importlib.util; print(importlib.util.find_spec('kernels').origin)"
    result = _run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not Path(result.stdout.strip()).resolve().is_relative_to(ROOT / "kernels"), result.stdout  # not our folder


def test_a_shadowing_import_says_what_to_do():
    """Importing ``kernels`` first, with the root on the path, gets our folder: it refuses with a
    message naming the cause and the fix instead of a puzzling missing name later."""
    result = _run(sys.executable, "-c", "import kernels")
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError:") and "shadows" in message and "-P" in message, result.stderr[-2000:]
