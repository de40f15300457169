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
def _emptied(module, *names: str) -> Iterator[None]:
    """``module``'s dictionaries ``names`` empty until the block ends."""
    with pytest.MonkeyPatch.context() as mp:
        for name in names:
            mp.setattr(module, name, {})
        yield


def fresh_worker() -> contextlib.AbstractContextManager[None]:
    """No loaded model or tokenizer until the block ends."""
    from dflash_batch.pipeline import _model

    return _emptied(_model, "_models", "_tokenizers")


def fresh_kernel_checks() -> contextlib.AbstractContextManager[None]:
    """No kernel self-check verdict, and no record of which implementation was traced."""
    from dflash_batch.kernels import _selfcheck

    return _emptied(_selfcheck, "_checks", "_used")
