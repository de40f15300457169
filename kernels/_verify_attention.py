"""Block-verify attention: T new queries per sequence against its ragged KV cache, causal
inside the block, grouped-query (G query heads per kv head).

Semantics (the decoder's attention over [cache ; block], with ``past = arange(S) < lengths`` and
``causal = tril(ones(T, T))``): query t of row b attends to cache rows ``< lengths[b]``
and to the block's keys ``0..t``, one softmax over both. ``lengths`` are clipped to
[0, S]; a length of 0 leaves only the block. Cache rows at or past the length may hold
anything, NaN included.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from dflash_batch.kernels import _block_attention as _ba
from dflash_batch.kernels._dispatch import kernel_mode
from dflash_batch.kernels._ordered_sum import ordered_sum
from dflash_batch.kernels._sharded import on_mesh

_PAD_ROWS = 16  # the reference's block rows are padded to a multiple of this (see its docstring)


@dataclasses.dataclass(frozen=True)
class VerifyBlockSizes:
    """Tiling of the Pallas kernel.

    block_s: cache rows per grid step (a multiple of 8; the whole cache when S <= block_s).
    block_kv_heads: kv heads per grid step (must divide K); None = all K heads.
    Defaults are untuned: no accelerator has run them yet (see tools/kernel_bench.py).
    """

    block_s: int = 512
    block_kv_heads: int | None = None

    def __post_init__(self):
        block_s, block_kv_heads = self.block_s, self.block_kv_heads
        if not isinstance(block_s, int) or block_s < 8 or block_s % 8:
            raise ValueError(f"{block_s=} must be a positive multiple of 8")
        if block_kv_heads is not None and (not isinstance(block_kv_heads, int) or block_kv_heads < 1):
            raise ValueError(f"{block_kv_heads=} must be None or a positive int")


def reference_verify_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                               k_new: jax.Array, v_new: jax.Array, *, cache_layout: str = "BKSH",
                               out_dtype=None) -> jax.Array:
    """Plain-jnp verify attention, computed so that a query's output does not depend on T.

    q [B, T, K, G, H]; k/v cache [B, K, S, H] ("BKSH") or [B, S, K, H] ("BSKH");
    lengths [B]; k/v new [B, T, K, H]. Returns [B, T, K, G, H] in ``out_dtype``
    (default q.dtype).

    Why not two parts (cache, then block, as the Pallas kernel does): query t of an L-token
    verify pass must give the same bits as the 1-token step at the same position, which sees
    block rows < t as cache rows. Summed as "cache part + block part", the two calls add the
    same numbers in different groupings, and the last-bit differences grow, in bfloat16, into
    different tokens. So:
      1. Append ``pad(T)`` empty rows to the cache (16 for any T <= 16, so a 1-token step and
         a block of up to 16 see the same array length) and write the block's rows at the
         sequence's positions ``length .. length + T - 1``.
      2. One masked softmax per query over that array: key j is visible to query t when
         ``j <= length + t``; its denominator is a fixed-order sum (``ordered_sum``).
      3. p @ V over the same array, accumulated in float32 (rows past the block zeroed, so
         whatever the cache holds there, NaN included, cannot leak).
    """
    k_cache, v_cache = _ba.to_bksh(k_cache, cache_layout), _ba.to_bksh(v_cache, cache_layout)
    b, t, n_kv, _, h = q.shape
    s_len = k_cache.shape[2]
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, s_len)
    extra = -(-t // _PAD_ROWS) * _PAD_ROWS
    positions = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    rows, heads = jnp.arange(b)[:, None, None], jnp.arange(n_kv)[None, :, None]

    def merged(cache, new):  # [B, K, S + extra, H] with the block at its positions
        cache = jnp.pad(cache, ((0, 0), (0, 0), (0, extra), (0, 0)))
        return cache.at[rows, heads, positions[:, None, :]].set(jnp.moveaxis(new, 1, 2).astype(cache.dtype))

    keys, values = merged(k_cache, k_new), merged(v_cache, v_new)
    visible = jnp.arange(s_len + extra)[None, None, :] <= positions[:, :, None]  # [B, T, S']
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", q, keys, preferred_element_type=jnp.float32) / math.sqrt(h)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    in_use = jnp.arange(s_len + extra)[None, :] < (lengths + t)[:, None]  # [B, S']
    values = jnp.where(in_use[:, None, :, None], values, jnp.zeros((), values.dtype))
    out = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(values.dtype), values, preferred_element_type=jnp.float32)
    out = out / ordered_sum(p)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).astype(jnp.dtype(out_dtype or q.dtype))


def _verify_attention_pallas(q, k_cache, v_cache, lengths, k_new, v_new, *, block_sizes: VerifyBlockSizes,
                             cache_layout: str, interpret, out_dtype) -> jax.Array:
    """The Pallas entry point (causal block); see _block_attention for the kernel."""
    return _ba.run_kernel(q, k_cache, v_cache, lengths, k_new, v_new, causal=True,
                          block_s=block_sizes.block_s, block_kv_heads=block_sizes.block_kv_heads,
                          cache_layout=cache_layout, interpret=interpret, out_dtype=out_dtype, name="verify_attention")


def verify_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                     k_new: jax.Array, v_new: jax.Array, *, block_sizes: VerifyBlockSizes = VerifyBlockSizes(),
                     interpret=False, impl: str | None = None, cache_layout: str = "BKSH",
                     out_dtype=None) -> jax.Array:
    """Verify attention, dispatched to the Pallas kernel or the reference.

    q [B, T, K, G, H]; k_cache, v_cache [B, K, S, H] (the decoder's KVCache layer
    layout, which the kernel reads as is) or [B, S, K, H] with ``cache_layout="BSKH"``
    (transposed on every call); lengths [B] int (cache rows < length are valid);
    k_new, v_new [B, T, K, H]. Returns [B, T, K, G, H] in ``out_dtype`` (default q.dtype).

    ``impl``: None (see kernels._dispatch), "reference", "pallas" or "interpret";
    ``interpret=True`` also runs the kernel in Pallas interpret mode.
    """
    _ba.check_inputs("verify_attention", q, k_cache, v_cache, lengths, k_new, v_new, cache_layout)
    out_dtype = jnp.dtype(out_dtype or q.dtype)
    mode, interp = kernel_mode("verify_attention", impl, interpret, reference_verify_attention)
    if mode == "reference":
        return reference_verify_attention(q, k_cache, v_cache, lengths, k_new, v_new,
                                          cache_layout=cache_layout, out_dtype=out_dtype)
    kernel = functools.partial(_verify_attention_pallas, block_sizes=block_sizes, cache_layout=cache_layout,
                               interpret=interp, out_dtype=out_dtype)
    return on_mesh(kernel, q, k_cache, v_cache, lengths, k_new, v_new, cache_layout)  # per device on a mesh
