"""Drafter attention: the L block queries of each sequence attend, with NO mask, to the
sequence's context rows ``< ctx_len[b]`` and to all L block rows; grouped-query.

Semantics (the decoder's attention over [cache ; block], with ``past = arange(S) < ctx_len`` and
an all-true [L, L] block mask, as decoder/_drafter.draft_block calls it). ``ctx_len`` is
clipped to [0, S]; 0 leaves only the block. Context rows at or past ctx_len may hold
anything, NaN included.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dflash_batch.kernels import _block_attention as _ba
from dflash_batch.kernels._dispatch import kernel_mode
from dflash_batch.kernels._sharded import on_mesh


@dataclasses.dataclass(frozen=True)
class DraftBlockSizes:
    """Tiling of the Pallas kernel.

    block_s: context rows per grid step (a multiple of 8; the whole context when S <= block_s).
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


def reference_draft_attention(q: jax.Array, ctx_k: jax.Array, ctx_v: jax.Array, ctx_len: jax.Array,
                              k_block: jax.Array, v_block: jax.Array, *, cache_layout: str = "BKSH",
                              out_dtype=None) -> jax.Array:
    """Plain-jnp drafter attention.

    q [B, L, K, G, H]; ctx_k/ctx_v [B, K, S, H] ("BKSH") or [B, S, K, H] ("BSKH");
    ctx_len [B]; k/v block [B, L, K, H]. Returns [B, L, K, G, H] in ``out_dtype``
    (default q.dtype).
    """
    ctx_k, ctx_v = _ba.to_bksh(ctx_k, cache_layout), _ba.to_bksh(ctx_v, cache_layout)
    blk = q.shape[1]
    ctx_len = jnp.clip(ctx_len.astype(jnp.int32), 0, ctx_k.shape[2])
    every = jnp.ones((blk, blk), bool)
    return _ba.reference_block_attention(q, ctx_k, ctx_v, ctx_len, k_block, v_block, every,
                                         jnp.dtype(out_dtype or q.dtype))


def _draft_attention_pallas(q, ctx_k, ctx_v, ctx_len, k_block, v_block, *, block_sizes: DraftBlockSizes,
                            cache_layout: str, interpret, out_dtype) -> jax.Array:
    """The Pallas entry point (non-causal block); see _block_attention for the kernel."""
    return _ba.run_kernel(q, ctx_k, ctx_v, ctx_len, k_block, v_block, causal=False,
                          block_s=block_sizes.block_s, block_kv_heads=block_sizes.block_kv_heads,
                          cache_layout=cache_layout, interpret=interpret, out_dtype=out_dtype, name="draft_attention")


def draft_attention(q: jax.Array, ctx_k: jax.Array, ctx_v: jax.Array, ctx_len: jax.Array,
                    k_block: jax.Array, v_block: jax.Array, *, block_sizes: DraftBlockSizes = DraftBlockSizes(),
                    interpret=False, impl: str | None = None, cache_layout: str = "BKSH",
                    out_dtype=None) -> jax.Array:
    """Drafter attention, dispatched to the Pallas kernel or the reference.

    q [B, L, K, G, H]; ctx_k, ctx_v [B, K, S, H] (one draft layer of the decoder's
    context cache, read as is) or [B, S, K, H] with ``cache_layout="BSKH"``; ctx_len [B]
    int; k_block, v_block [B, L, K, H]. Returns [B, L, K, G, H] in ``out_dtype``
    (default q.dtype). ``impl`` and ``interpret`` as for verify_attention.
    """
    _ba.check_inputs("draft_attention", q, ctx_k, ctx_v, ctx_len, k_block, v_block, cache_layout)
    out_dtype = jnp.dtype(out_dtype or q.dtype)
    mode, interp = kernel_mode("draft_attention", impl, interpret, reference_draft_attention)
    if mode == "reference":
        return reference_draft_attention(q, ctx_k, ctx_v, ctx_len, k_block, v_block,
                                         cache_layout=cache_layout, out_dtype=out_dtype)
    kernel = functools.partial(_draft_attention_pallas, block_sizes=block_sizes, cache_layout=cache_layout,
                               interpret=interp, out_dtype=out_dtype)
    return on_mesh(kernel, q, ctx_k, ctx_v, ctx_len, k_block, v_block, cache_layout)  # per device on a mesh
