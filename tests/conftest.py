"""Shared fixtures: tiny checkpoints are built once per session so JAX compiles stay few.

The session also keeps a persistent JAX compilation cache in a temporary folder (removed when
the session ends): the pytest and job processes the tests start inherit it, so a program that
one process compiled is loaded, not compiled again, by every other (mesh suites, CLI runs, and
fresh jit wrappers of the same computation in this process).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # helper modules beside the tests

from xla_test_flags import TEST_XLA_FLAGS, xla_flags  # noqa: E402

if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = xla_flags(1)
elif TEST_XLA_FLAGS not in os.environ["XLA_FLAGS"]:  # a process a test started with its own device count
    os.environ["XLA_FLAGS"] += f" {TEST_XLA_FLAGS}"
# Python processes the tests start (``-c``, ``-m``) must not put the repository root first on their
# path: its top-level folders (kernels/, decoder/, ...) would shadow installed packages of the same
# name (transformers imports a ``kernels`` package). ``make test`` runs pytest itself with ``-P``.
os.environ["PYTHONSAFEPATH"] = "1"

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # else a parent session's, or the user's own
    _cache = tempfile.mkdtemp(prefix="dflash-batch-tests-jax-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    # Every program, however quick to compile: the point is that no process compiles it twice.
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    if "jax" in sys.modules:  # imported before this file (a plugin): it read its settings already
        import jax

        jax.config.update("jax_compilation_cache_dir", _cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3", seed=1)


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from dflash_batch.decoder import load_target

    return load_target(str(tiny_llama_dir), with_tokenizer=False)


@pytest.fixture(scope="module")
def tiny_drafter(tiny_llama):
    """A random DFlash drafter (2 layers, block 8) for the tiny Llama."""
    from tiny_models import random_drafter

    return random_drafter(tiny_llama.config, block_size=8)


def pytest_collection_modifyitems(config, items):
    """Files that hold a minutes-long test come first, then files that hold a slow one, then the
    rest, each part in its usual order.

    ``make test`` hands whole files to two processes as each becomes free, in this order
    (``--dist loadfile --no-loadscope-reorder``). A minutes-long file taken up last would leave
    one process working alone at the end; taken up first, the other process meanwhile works
    through the many short files, and both finish at about the same time.
    """
    minutes = {item.path for item in items if item.get_closest_marker("minutes")}
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path not in minutes, item.path not in slow))  # stable
