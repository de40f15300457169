"""Which attention implementation the decoder gets: the Pallas kernel or the jnp reference.

Order of precedence:
  1. an explicit ``impl=`` argument to an op (or ``interpret=True`` with ``impl=None``,
     which means the kernel in interpret mode);
  2. the innermost ``use_attention_impl(...)`` context;
  3. the environment variable ``DFLASH_BATCH_KERNELS`` (reference | pallas | interpret);
  4. the default backend: "pallas" on TPU, "reference" elsewhere. The kernels are written
     for Mosaic TPU only; on GPU and CPU, XLA runs the reference.

"interpret" runs the Pallas kernel in Pallas interpret mode: slow, but on any backend, so
tests on CPU can put the kernel itself in the decoder's path.

The choice is read when a function is traced: a jitted function keeps the implementation
it was traced with until it is traced again.

A kernel chosen by 2-4 (not by an explicit argument) first checks itself against its reference
on this device, once per process (``_selfcheck``); one that fails is replaced by the reference,
with a warning. ``attention_report()`` says what the decoder's programs were traced with.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import jax

from dflash_batch.kernels._selfcheck import record_use, self_check

IMPLS = ("reference", "pallas", "interpret")
ENV_VAR = "DFLASH_BATCH_KERNELS"

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("dflash_batch_kernels", default=None)


def _check(impl: str, source: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{source}: {impl=} must be one of {IMPLS}")
    return impl


def default_impl() -> str:
    """"pallas" where the kernels lower natively (TPU), "reference" elsewhere."""
    return "pallas" if jax.default_backend() == "tpu" else "reference"


def attention_impl(impl: str | None = None) -> str:
    """Resolves the implementation to use now (see the module docstring for the order)."""
    if impl is not None:
        return _check(impl, "impl argument")
    ctx = _override.get()
    if ctx is not None:
        return ctx
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
        return _check(env, ENV_VAR)
    return default_impl()


@contextlib.contextmanager
def use_attention_impl(impl: str) -> Iterator[str]:
    """Forces an implementation inside the block (thread- and task-local)."""
    token = _override.set(_check(impl, "use_attention_impl"))
    try:
        yield impl
    finally:
        _override.reset(token)


def kernel_mode(op: str, impl: str | None, interpret, reference) -> tuple[str, object]:
    """Returns ("reference", None) or ("kernel", interpret flag) for an op call.

    A truthy ``interpret`` (True or pltpu.InterpretParams) with ``impl=None`` asks for the
    kernel in interpret mode, whatever the context says; an explicit impl="reference" wins.
    ``reference`` is the op's plain-jnp version, which the kernel's self-check compares against.
    """
    if impl is None and interpret:
        return "kernel", interpret
    chosen = attention_impl(impl)
    if impl is None:  # the decoder's calls: what it runs is recorded, and a kernel must pass its check
        if chosen != "reference" and not (check := self_check(op, chosen, reference)).passed:
            record_use(op, "reference", fallback=check)
            return "reference", None
        record_use(op, chosen)
    if chosen == "reference":
        return "reference", None
    if chosen == "interpret" or interpret:
        return "kernel", interpret or True
    backend = jax.default_backend()
    if backend != "tpu":
        raise ValueError(f"{op}: impl='pallas' needs a TPU (Mosaic); {backend=}. "
                         "Use impl='interpret' (or interpret=True) to run the kernel elsewhere.")
    return "kernel", False
