"""Counts XLA backend compilations, as an accelerator runtime's recompilation check does."""

from __future__ import annotations

import contextlib

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_count = 0


def _listener(name: str, *_args, **_kwargs) -> None:
    global _count
    if name == _EVENT:
        _count += 1


jax.monitoring.register_event_duration_secs_listener(_listener)


@contextlib.contextmanager
def count_compiles():
    """Yields a callable returning how many compilations happened inside the block."""
    start = _count
    yield lambda: _count - start
