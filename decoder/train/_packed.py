"""The drafter's training forward: A blocks per sequence in one pass, each seeing only what
its decode step would see.

The attention rule, per block a with anchor position p_a (DESIGN section 4):
  * context row j is visible iff j < p_a: the features of rows the target has already
    run over. The anchor itself has not been through the target at that step, so row
    p_a and everything after it are hidden;
  * the block's own L rows are all visible (no causal mask: the masks are denoised
    jointly);
  * another block's rows never are (no cross-block attention).
Over the packed key axis [S context rows ; A*L block rows] this is the mask that
``attention_mask`` returns: a prefix mask per block on the context part and a
block-diagonal mask on the block part. The forward applies it in factored form: the
context part as [B, A, S], the block part by computing scores only inside each block,
which never materialises the (A*L)^2 cross-block scores.

Axes: B sequences, A anchors, L block, S context, N/K/G/H heads, D model, n_f features.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dflash_batch.decoder._drafter_config import DrafterConfig
from dflash_batch.decoder._drafter import Attend, context_kv, draft_head, draft_layer, embed_block
from dflash_batch.decoder._layers import scan_layers
from dflash_batch.decoder._target import Params


def context_mask(anchor_pos: jax.Array, seq_len: int) -> jax.Array:
    """[B, A, S]: block a may see context row j iff j < anchor_pos[b, a]."""
    return jnp.arange(seq_len)[None, None, :] < anchor_pos[:, :, None]


def attention_mask(anchor_pos: jax.Array, seq_len: int, block_size: int) -> jax.Array:
    """The full packed mask [B, A*L, S + A*L] (True = may attend) that the forward applies.

    Query row a*L + i belongs to block a. Keys are the S context rows, then the A*L
    block rows in the same order. For tests and inspection: the forward never builds it.
    """
    b, a = anchor_pos.shape
    ctx = jnp.repeat(context_mask(anchor_pos, seq_len), block_size, axis=1)  # [B, A*L, S]
    blocks = jnp.repeat(jnp.repeat(jnp.eye(a, dtype=bool), block_size, axis=0), block_size, axis=1)  # [A*L, A*L]
    return jnp.concatenate([ctx, jnp.broadcast_to(blocks, (b, a * block_size, a * block_size))], axis=-1)


def packed_attention(ck: jax.Array, cv: jax.Array, visible: jax.Array, blocks: int) -> Attend:
    """The training forward's attention for ``draft_layer``: ONE softmax over the context rows
    block a may see (``visible`` [B, A, S]; ck, cv [B, S, K, H]) and the block's own L rows.

    Scores are computed only inside each block, so the (A*L)^2 cross-block scores never
    exist; scores, softmax and the weighted sums are float32, as in the decoder's kernels.
    """

    def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        bsz, t, k_heads, g, h = q.shape  # t = A*L
        blk = t // blocks
        scale = 1.0 / math.sqrt(h)
        q = q.reshape(bsz, blocks, blk, k_heads, g, h)  # [B, A, L, K, G, H]
        k = k.reshape(bsz, blocks, blk, k_heads, h)  # [B, A, L, K, H]
        v = v.reshape(bsz, blocks, blk, k_heads, h)
        f32 = jnp.float32
        s_c = jnp.einsum("BALKGH,BSKH->BAKGLS", q, ck, preferred_element_type=f32) * scale
        s_b = jnp.einsum("BALKGH,BAMKH->BAKGLM", q, k, preferred_element_type=f32) * scale
        s_c = jnp.where(visible[:, :, None, None, None, :], s_c, -jnp.inf)  # [B, A, K, G, L, S]
        m = jnp.maximum(jnp.max(s_c, axis=-1, keepdims=True), jnp.max(s_b, axis=-1, keepdims=True))
        p_c, p_b = jnp.exp(s_c - m), jnp.exp(s_b - m)
        denom = jnp.sum(p_c, axis=-1) + jnp.sum(p_b, axis=-1)  # [B, A, K, G, L]
        o = (jnp.einsum("BAKGLS,BSKH->BALKGH", p_c.astype(cv.dtype), cv, preferred_element_type=f32)
             + jnp.einsum("BAKGLM,BAMKH->BALKGH", p_b.astype(v.dtype), v, preferred_element_type=f32))
        o = o / jnp.moveaxis(denom, -1, 2)[..., None]  # [B, A, L, K, G, H]
        return o.reshape(bsz, t, k_heads, g, h).astype(q.dtype)

    return attend


def packed_draft_logits(dparams: Params, dcfg: DrafterConfig, target_params: Params, feats: jax.Array,
                        feat_inv_scale: jax.Array, block_tokens: jax.Array, anchor_pos: jax.Array) -> jax.Array:
    """Draft logits [B, A, L-1, V or V_d] for A blocks per sequence, computed in the dtype of
    ``dparams`` (pass bf16 copies of float32 master weights for mixed precision).

    feats [B, S, n_f, D]: the sequence's cached target features (any dtype);
    feat_inv_scale [n_f, D]: multiplies the features before ``fc`` (the per-channel
    standardisation; ones for raw features); block_tokens [B, A, L]; anchor_pos [B, A].

    Steps (the decoder's own ``context_kv``, ``draft_layer`` and ``draft_head``, for all
    blocks at once):
      1. Context k/v of every draft layer from RMSNorm(fc(feats * inv_scale)), RoPE at the
         row's position.
      2. Per draft layer: block q/k/v (RoPE at p_a + i), then ONE softmax over [visible
         context rows ; the block's own rows] (``packed_attention``), o_proj, MLP.
      3. Final norm and the output head on block rows 1..L-1.
    """
    bsz, s_len, _, _ = feats.shape
    _, a, blk = block_tokens.shape
    dtype = dparams["fc"].dtype
    ctx_pos = jnp.broadcast_to(jnp.arange(s_len, dtype=jnp.int32)[None], (bsz, s_len))  # [B, S]
    ck, cv = context_kv(dparams, dcfg, feats.astype(dtype) * feat_inv_scale.astype(dtype), ctx_pos)  # [Ld, B, S, K, H]
    blk_pos = (anchor_pos[:, :, None] + jnp.arange(blk, dtype=jnp.int32)).reshape(bsz, a * blk)  # [B, A*L]
    visible = context_mask(anchor_pos, s_len)  # [B, A, S]
    x = embed_block(dparams, dcfg, target_params, block_tokens).reshape(bsz, a * blk, -1)  # [B, A*L, D]

    def layer(x, xs):
        w, lk, lv = xs
        return draft_layer(w, dcfg, x, blk_pos, packed_attention(lk, lv, visible, a)), None

    x, _ = scan_layers(layer, x, (dparams["layers"], ck, cv))  # [B, A*L, D]
    return draft_head(dparams, dcfg, target_params, x.reshape(bsz, a, blk, -1)[:, :, 1:])  # [B, A, L-1, V]
