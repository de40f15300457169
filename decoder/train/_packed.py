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

from dflash_batch.decoder._drafter import DrafterConfig
from dflash_batch.decoder._layers import apply_rope, rms_norm, rope_inv_freq, swiglu
from dflash_batch.decoder._target import Params, lm_head


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


def packed_draft_logits(dparams: Params, dcfg: DrafterConfig, target_params: Params, feats: jax.Array,
                        feat_inv_scale: jax.Array, block_tokens: jax.Array, anchor_pos: jax.Array) -> jax.Array:
    """Draft logits [B, A, L-1, V or V_d] for A blocks per sequence.

    feats [B, S, n_f, D]: the sequence's cached target features (any dtype);
    feat_inv_scale [n_f, D]: multiplies the features before ``fc`` (the per-channel
    standardisation; ones for raw features); block_tokens [B, A, L]; anchor_pos [B, A].

    Steps (``context_kv`` then ``draft_block`` of the decoder, for all blocks at once):
      1. Context vector per row: RMSNorm(fc(feats * inv_scale)).
      2. Per draft layer: context k/v (k_norm, RoPE at the row's position); block q/k/v
         from the block rows (q_norm/k_norm, RoPE at p_a + i).
      3. Attention with ONE softmax over [visible context rows ; the block's own rows].
      4. o_proj + residual, SwiGLU MLP + residual.
      5. Final norm and the output head on block rows 1..L-1.
    """
    bsz, s_len, n_f, d = feats.shape
    _, a, blk = block_tokens.shape
    n, k_heads, g, h = dcfg.num_heads, dcfg.num_kv_heads, dcfg.group_size, dcfg.head_dim
    eps = dcfg.rms_norm_eps
    inv_freq = rope_inv_freq(dcfg)
    dtype = dparams["fc"].dtype

    x_feat = (feats.astype(dtype) * feat_inv_scale.astype(dtype)).reshape(bsz, s_len, n_f * d)  # [B, S, n_f*D]
    c = rms_norm(x_feat @ dparams["fc"], dparams["hidden_norm"], eps)  # [B, S, D]
    ctx_pos = jnp.broadcast_to(jnp.arange(s_len, dtype=jnp.int32)[None], (bsz, s_len))  # [B, S]
    blk_pos = (anchor_pos[:, :, None] + jnp.arange(blk, dtype=jnp.int32)).reshape(bsz, a * blk)  # [B, A*L]
    visible = context_mask(anchor_pos, s_len)  # [B, A, S]

    x = jnp.take(target_params["embed"], block_tokens, axis=0).astype(dtype)  # [B, A, L, D]
    if dcfg.mask_embedding:
        is_mask = (block_tokens == dcfg.mask_token_id) & (jnp.arange(blk) > 0)  # [B, A, L]
        x = jnp.where(is_mask[..., None], dparams["mask_embedding"].astype(dtype), x)
    scale = 1.0 / math.sqrt(h)

    def layer(x, w):
        # Context keys/values: no query, no MLP, no update (as in ``context_kv``).
        ck, cv = jnp.split(c @ w["qkv"][:, n * h:], 2, axis=-1)  # [B, S, K*H] each
        ck = apply_rope(rms_norm(ck.reshape(bsz, s_len, k_heads, h), w["k_norm"], eps), ctx_pos, inv_freq)
        cv = cv.reshape(bsz, s_len, k_heads, h)  # [B, S, K, H]
        hn = rms_norm(x, w["attn_norm"], eps)
        q, k, v = jnp.split(hn @ w["qkv"], [n * h, (n + k_heads) * h], axis=-1)
        q = apply_rope(rms_norm(q.reshape(bsz, a * blk, n, h), w["q_norm"], eps), blk_pos, inv_freq)
        k = apply_rope(rms_norm(k.reshape(bsz, a * blk, k_heads, h), w["k_norm"], eps), blk_pos, inv_freq)
        q = q.reshape(bsz, a, blk, k_heads, g, h)  # [B, A, L, K, G, H]
        k = k.reshape(bsz, a, blk, k_heads, h)  # [B, A, L, K, H]
        v = v.reshape(bsz, a, blk, k_heads, h)
        s_c = jnp.einsum("BALKGH,BSKH->BAKGLS", q, ck, preferred_element_type=jnp.float32) * scale
        s_b = jnp.einsum("BALKGH,BAMKH->BAKGLM", q, k, preferred_element_type=jnp.float32) * scale
        s_c = jnp.where(visible[:, :, None, None, None, :], s_c, -jnp.inf)  # [B, A, K, G, L, S]
        m = jnp.maximum(jnp.max(s_c, axis=-1, keepdims=True), jnp.max(s_b, axis=-1, keepdims=True))
        p_c, p_b = jnp.exp(s_c - m), jnp.exp(s_b - m)
        denom = jnp.sum(p_c, axis=-1) + jnp.sum(p_b, axis=-1)  # [B, A, K, G, L]
        o = (jnp.einsum("BAKGLS,BSKH->BALKGH", p_c.astype(dtype), cv)
             + jnp.einsum("BAKGLM,BAMKH->BALKGH", p_b.astype(dtype), v))
        o = o / jnp.moveaxis(denom, -1, 2)[..., None]  # [B, A, L, K, G, H]
        x = x + o.reshape(bsz, a, blk, n * h) @ w["o"]
        x = x + swiglu(rms_norm(x, w["mlp_norm"], eps), w["gate_up"], w["down"])
        return x, None

    x, _ = jax.lax.scan(layer, x, dparams["layers"])  # [B, A, L, D]
    x = rms_norm(x[:, :, 1:], dparams["norm"], eps)  # [B, A, L-1, D]
    if "lm_head" in dparams:
        return jnp.einsum("BALD,DV->BALV", x, dparams["lm_head"], preferred_element_type=jnp.float32)
    return lm_head(target_params, x)  # [B, A, L-1, V]
