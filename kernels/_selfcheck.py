"""Each Pallas kernel checks itself against its jnp reference before it decodes anything.

A kernel whose Mosaic lowering computes something wrong on real hardware would otherwise write
wrong completions at full speed. So the first time the dispatch (``_dispatch.kernel_mode``)
would put a kernel in the decoder's program on a device, the kernel runs on a small input beside
its reference, once per process:

1. Build a small case that exercises what the decoder relies on: several cache tiles (``S`` =
   2 tiles of 8 rows), ragged lengths (0, mid-tile, full), NaN in the dead cache rows, grouped
   query heads; in float32 and in bfloat16, each with its own tolerance.
2. Run the kernel (``_block_attention.run_kernel``, what every device runs) and the op's
   reference on it, on a thread of its own so that the values are concrete even while the
   decoder's step is being traced (JAX's trace state is per thread).
3. Pass when every output is finite and within ``TOLERANCE`` of the reference (atol = rtol);
   a kernel that raises fails too.
4. Remember the verdict for (op, implementation, device kind): a failed kernel is replaced by
   its reference for the rest of the process, with a warning, and ``attention_report`` tells
   the job's statistics which implementation each op was traced with and why.

Only the implementation chosen by default, context or environment is checked; an explicit
``impl=`` or ``interpret=`` (what the kernel tests use) gets exactly what it asks for.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from dflash_batch.kernels import _block_attention

TOLERANCE = {"float32": 2e-4, "bfloat16": 3e-2}  # atol = rtol; bf16 keeps 8 bits of mantissa
BLOCK_S = 8  # cache rows per tile in the check: S = 2 tiles (interpret mode on CPU runs it in seconds)

_lock = threading.Lock()
_checks: dict[tuple[str, str, str], "SelfCheck"] = {}
_used: dict[str, dict[str, str | None]] = {}  # op -> {"impl": traced with, "fallback": why, or None}


class KernelFallbackWarning(RuntimeWarning):
    """A Pallas kernel disagreed with its reference; the reference decodes instead."""


@dataclasses.dataclass(frozen=True)
class SelfCheck:
    op: str
    impl: str  # "pallas" or "interpret"
    device: str
    passed: bool
    max_error: float | None  # the largest |kernel - reference| over the cases, when they ran
    detail: str  # what failed, or "within tolerance"

    def describe(self) -> str:
        err = "" if self.max_error is None else f", max |error| {self.max_error:.3g}"
        return f"self-check on {self.device} {'passed' if self.passed else 'FAILED'}: {self.detail}{err}"


def _device() -> str:
    return f"{jax.default_backend()}:{jax.devices()[0].device_kind}"


def _case(op: str, dtype, key: int = 0):
    """(q, k_cache, v_cache, lengths, k_new, v_new) for ``op``: B 3, T 4, K 2, G 2, H 64, S 16."""
    b, t, k, g, h, s = 3, 4, 2, 2, 64, 2 * BLOCK_S
    keys = jax.random.split(jax.random.PRNGKey(key), 5)
    q = jax.random.normal(keys[0], (b, t, k, g, h), jnp.float32)
    kc = jax.random.normal(keys[1], (b, k, s, h), jnp.float32)
    vc = jax.random.normal(keys[2], (b, k, s, h), jnp.float32)
    lengths = jnp.asarray([0, 11, s], jnp.int32)
    dead = jnp.arange(s)[None, None, :, None] >= lengths[:, None, None, None]
    kc, vc = jnp.where(dead, jnp.nan, kc), jnp.where(dead, jnp.nan, vc)  # rows past a length may hold anything
    kn = jax.random.normal(keys[3], (b, t, k, h), jnp.float32)
    vn = jax.random.normal(keys[4], (b, t, k, h), jnp.float32)
    return tuple(x.astype(dtype) if x.dtype == jnp.float32 else x for x in (q, kc, vc, lengths, kn, vn))


def _run(op: str, impl: str, reference) -> SelfCheck:
    worst = 0.0
    for dtype_name, tol in TOLERANCE.items():
        args = _case(op, jnp.dtype(dtype_name))
        kernel = functools.partial(_block_attention.run_kernel, causal=op == "verify_attention", block_s=BLOCK_S,
                                   block_kv_heads=None, cache_layout="BKSH", interpret=impl == "interpret",
                                   out_dtype=jnp.dtype(dtype_name), name=op)
        try:
            got, want = np.asarray(jax.jit(kernel)(*args), np.float32), np.asarray(reference(*args), np.float32)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run on this device fails its check
            return SelfCheck(op, impl, _device(), False, None, f"{dtype_name}: the kernel raised "
                                                                f"{type(e).__name__}: {e}")
        err = np.abs(got - want)
        worst = max(worst, float(np.nanmax(err)) if np.isfinite(err).any() else float("inf"))
        if not np.isfinite(got).all() or not np.allclose(got, want, atol=tol, rtol=tol):
            return SelfCheck(op, impl, _device(), False, worst, f"{dtype_name} output differs from the reference "
                                                                f"beyond atol=rtol={tol}")
    return SelfCheck(op, impl, _device(), True, worst, "within tolerance in " + " and ".join(TOLERANCE))


def _run_untraced(op: str, impl: str, reference) -> SelfCheck:
    """``_run`` on a thread of its own: JAX's trace state is per thread, so the check computes
    concrete values even when the decoder's step is being traced on this one."""
    out: list[SelfCheck] = []
    worker = threading.Thread(target=lambda: out.append(_run(op, impl, reference)), name=f"self-check {op}")
    worker.start()
    worker.join()
    if not out:
        return SelfCheck(op, impl, _device(), False, None, "the check itself failed to run (see the log)")
    return out[0]


def self_check(op: str, impl: str, reference) -> SelfCheck:
    """The verdict on ``op``'s kernel run as ``impl`` on this process's device (checked once),
    against ``reference``, the op's plain-jnp version."""
    key = (op, impl, _device())
    with _lock:
        if key not in _checks:
            _checks[key] = check = _run_untraced(op, impl, reference)
            if not check.passed:
                warnings.warn(f"{op}: the {impl} kernel {check.describe()}; the jnp reference decodes instead for "
                              "the rest of this process", KernelFallbackWarning, stacklevel=2)
        return _checks[key]


def record_use(op: str, impl: str, fallback: SelfCheck | None = None) -> None:
    """Notes the implementation the decoder's program was just traced with for ``op``."""
    with _lock:
        _used[op] = {"impl": impl, "fallback": None if fallback is None else f"{fallback.impl} kernel "
                                                                            f"{fallback.describe()}"}


def attention_report() -> dict[str, dict[str, str | None]]:
    """Per attention op: the implementation its latest traced program uses and, after a failed
    self-check, why the reference replaced the kernel."""
    with _lock:
        return {op: dict(v) for op, v in sorted(_used.items())}
