"""Counts XLA compilations, as an accelerator runtime's recompilation check does.

A program served from the persistent compilation cache (the test session keeps one) is never
handed to the backend compiler, yet it was traced and looked up again all the same: it counts.
"""

from __future__ import annotations

import contextlib

import jax

_COMPILED = "/jax/core/compile/backend_compile_duration"
_LOADED = "/jax/compilation_cache/cache_hits"
_count = 0


def _on_duration(name: str, *_args, **_kwargs) -> None:
    global _count
    if name == _COMPILED:
        _count += 1


def _on_event(name: str, *_args, **_kwargs) -> None:
    global _count
    if name == _LOADED:
        _count += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)
jax.monitoring.register_event_listener(_on_event)


@contextlib.contextmanager
def count_compiles():
    """Yields a callable returning how many compilations happened inside the block."""
    start = _count
    yield lambda: _count - start
