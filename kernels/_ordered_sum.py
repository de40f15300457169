"""A sum over the last axis whose rounding does not depend on the array's other dimensions.

XLA's CPU backend picks how it vectorizes a reduction from the whole shape: the same 576
numbers summed as one of 4 rows and as one of 32 rows can round differently (measured:
RMSNorm's mean of squares differed in the last bit for 3 of 4 rows). A 1-token decode step
and an L-token verify pass then disagree, and in bfloat16 that last bit can grow, over the
layers, into another token. Written as a fixed tree of elementwise additions, each output is
the same expression of its own inputs whatever the batch or block size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ordered_sum(x: jax.Array) -> jax.Array:
    """``x.sum(-1, keepdims=True)`` as a pairwise tree over the last axis, padded with zeros to a power of two.

    The padding is exact (``a + 0 == a``), so two inputs whose last axes differ only in
    trailing zeros sum to the same bits when they pad to the same power of two.
    """
    n = x.shape[-1]
    width = 1 << max(n - 1, 0).bit_length()
    if width != n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - n)])
    while width > 1:
        width //= 2
        x = x[..., :width] + x[..., width:]
    return x
