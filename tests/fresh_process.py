"""This test process as a fresh one: no loaded model, no kernel verdict, for the length of a block.

The product keeps both once per process on purpose (a worker loads its model once; a kernel is
checked once). A test that must see a load or a check happen swaps those caches for empty ones;
the caches from before come back when the block ends.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest


@contextlib.contextmanager
def fresh_worker() -> Iterator[None]:
    """No loaded model or tokenizer until the block ends."""
    from dflash_batch.pipeline import _model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_model, "_models", {})
        mp.setattr(_model, "_tokenizers", {})
        yield


@contextlib.contextmanager
def fresh_kernel_checks() -> Iterator[None]:
    """No kernel self-check verdict, and no record of which implementation was traced."""
    from dflash_batch.kernels import _selfcheck

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_selfcheck, "_checks", {})
        mp.setattr(_selfcheck, "_used", {})
        yield
