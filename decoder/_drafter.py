"""The DFlash drafter's forward: a few Qwen3-style layers that draft a whole block in one pass.

The pieces here serve decoding (``context_kv`` + ``draft_block``) and training
(``train/_packed.py``) alike: the block embedding, ONE draft layer (``draft_layer``, with
the attention passed in, since decoding reads a context cache and training a packed
sequence), and the output head. The config lives in ``_drafter_config``, checkpoints in
``_drafter_checkpoint``; their public names are re-exported here.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dflash_batch.decoder._config import TargetConfig
from dflash_batch.decoder._drafter_config import DrafterConfig
from dflash_batch.decoder._layers import apply_rope, dense, matmul_rows, mlp, qkv_proj, rms_norm, rope_inv_freq, scan_layers
from dflash_batch.decoder._target import Params, embed, lm_head
from dflash_batch.kernels import draft_attention

# attend(q [B, T, K, G, H], k [B, T, K, H], v [B, T, K, H]) -> o [B, T, K, G, H]: how a draft
# layer's block queries meet the context rows and the block's own keys.
Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def context_vectors(dparams: Params, dcfg: DrafterConfig, target_feats: jax.Array) -> jax.Array:
    """c [B, T, D] = RMSNorm(fc(concat of the n_f target features)), in the drafter weights' dtype.

    target_feats [B, T, n_f, D] in any dtype (the target's, or fp16 from a feature cache).
    """
    b, t, n_f, d = target_feats.shape
    if (n_f, d) != (dcfg.num_features, dcfg.hidden_size):
        raise ValueError(f"target_feats {target_feats.shape=} must end in ({dcfg.num_features}, {dcfg.hidden_size})")
    feats = target_feats.reshape(b, t, n_f * d).astype(dparams["fc"].dtype)  # [B, T, n_f*D]
    return rms_norm(dense(feats, dparams["fc"]), dparams["hidden_norm"], dcfg.rms_norm_eps)


def context_kv(dparams: Params, dcfg: DrafterConfig, target_feats: jax.Array,
               positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Context keys and values of every draft layer for newly committed tokens.

    target_feats [B, T, n_f, D]: outputs of target layers ``target_layer_ids``;
    positions [B, T]: the tokens' absolute positions. Returns (k, v), each [draft_layers, B, T, K, H]
    (append them to the [draft_layers, B, K, S, H] context cache with ``_target.write_rows``).

    Steps:
      1. Concatenate the n_f features per token, project with ``fc`` and RMSNorm
         (``hidden_norm``): one context vector c per token.
      2. For every draft layer: k = RoPE(k_norm(c Wk)) at the token's position, v = c Wv.

    Context rows get no query, no MLP and no residual update, so their K/V depend on the
    target's features alone. They are computed once when a token is committed and
    appended to a per-layer cache; rejected drafts never touch them, so that cache needs
    no rollback.
    """
    c = context_vectors(dparams, dcfg, target_feats)  # [B, T, D]
    b, t, _ = c.shape
    k_heads, h = dcfg.num_kv_heads, dcfg.head_dim
    inv_freq = rope_inv_freq(dcfg)
    kv_cols = dcfg.num_heads * h  # only the k|v columns of the fused qkv: context rows have no query

    def one_layer(w):
        if "qkv" in w:
            k, v = jnp.split(dense(c, w["qkv"][:, kv_cols:]), 2, axis=-1)  # [B, T, K*H] each
        else:  # tensor-parallel layout: separate projections
            k, v = dense(c, w["k"]), dense(c, w["v"])
        k = rms_norm(k.reshape(b, t, k_heads, h), w["k_norm"], dcfg.rms_norm_eps)  # [B, T, K, H]
        return apply_rope(k, positions, inv_freq), v.reshape(b, t, k_heads, h)

    layers = dparams["layers"]
    wanted = {n: layers[n] for n in ("qkv", "k", "v", "k_norm") if n in layers}
    return jax.vmap(one_layer)(wanted)  # [draft_layers, B, T, K, H] each


def embed_block(dparams: Params, dcfg: DrafterConfig, target_params: Params, block_tokens: jax.Array) -> jax.Array:
    """block_tokens [..., L] -> [..., L, D] in the drafter weights' dtype, with the TARGET's embedding.

    Mask tokens at positions 1..L-1 take the drafter's learned mask embedding when it has
    one (the anchor never does, even if it happens to equal mask_token_id).
    """
    x = embed(target_params, block_tokens).astype(dparams["fc"].dtype)
    if dcfg.mask_embedding:
        blk = block_tokens.shape[-1]
        is_mask = (block_tokens == dcfg.mask_token_id) & (jnp.arange(blk) > 0)  # [..., L]
        x = jnp.where(is_mask[..., None], dparams["mask_embedding"].astype(x.dtype), x)
    return x


def draft_layer(w: Params, dcfg: DrafterConfig, x: jax.Array, positions: jax.Array, attend: Attend) -> jax.Array:
    """One Qwen3 pre-norm draft layer over the block rows x [B, T, D] at ``positions`` [B, T].

    Steps:
      1. q, k, v from the block rows only; q_norm / k_norm, then RoPE at each row's position.
      2. ``attend``: the block's queries over the context rows it may see and the block's
         own keys, with NO causal mask (the masks are denoised jointly).
      3. o_proj + residual, SwiGLU MLP + residual.
    """
    bsz, t, _ = x.shape
    n, k_heads, g, h, eps = dcfg.num_heads, dcfg.num_kv_heads, dcfg.group_size, dcfg.head_dim, dcfg.rms_norm_eps
    inv_freq = rope_inv_freq(dcfg)
    q, k, v = qkv_proj(rms_norm(x, w["attn_norm"], eps), w, n * h, k_heads * h)  # [B, T, N H], [B, T, K H] x 2
    q = apply_rope(rms_norm(q.reshape(bsz, t, n, h), w["q_norm"], eps), positions, inv_freq)  # [B, T, N, H]
    k = apply_rope(rms_norm(k.reshape(bsz, t, k_heads, h), w["k_norm"], eps), positions, inv_freq)  # [B, T, K, H]
    o = attend(q.reshape(bsz, t, k_heads, g, h), k, v.reshape(bsz, t, k_heads, h))  # [B, T, K, G, H]
    x = x + dense(o.reshape(bsz, t, n * h), w["o"])
    return x + mlp(rms_norm(x, w["mlp_norm"], eps), w)


def draft_head(dparams: Params, dcfg: DrafterConfig, target_params: Params, x: jax.Array) -> jax.Array:
    """Final ``norm``, then the output head: float32 logits [..., V], or [..., V_d] with the
    drafter's own reduced head (map ids with ``draft_to_target_ids``)."""
    x = rms_norm(x, dparams["norm"], dcfg.rms_norm_eps)
    if "lm_head" in dparams:
        return matmul_rows(x, dparams["lm_head"], "...D,DV->...V")  # V = V_d
    return lm_head(target_params, x.astype(target_params["embed"].dtype))


def draft_block(dparams: Params, dcfg: DrafterConfig, target_params: Params, target_cfg: TargetConfig,
                block_tokens: jax.Array, block_start: jax.Array, ctx_k: jax.Array, ctx_v: jax.Array,
                ctx_len: jax.Array) -> jax.Array:
    """Draft logits for block positions 1..L-1 of every row, from ONE drafter pass.

    block_tokens [B, L]: [anchor, MASK x (L-1)], the anchor being the last committed
    token; block_start [B]: the anchor's absolute position; ctx_k, ctx_v [draft_layers, B, K, S, H]
    from ``context_kv``, of which rows < ctx_len [B] are valid (later rows may hold
    anything finite). Returns logits [B, L-1, V] fp32, or [B, L-1, V_d] for a
    reduced-vocabulary drafter (map ids with ``draft_to_target_ids``).

    Steps:
      1. Embed the block with the TARGET's embedding (``embed_block``).
      2. Per draft layer (``draft_layer``): attention over [context rows < ctx_len ; all L
         block rows] with NO causal mask, then the MLP.
      3. Final ``norm`` and the head on rows 1..L-1: row 0 is the anchor, already committed.
    """
    dcfg.check_target(target_cfg)
    blk = block_tokens.shape[1]  # L
    positions = block_start[:, None] + jnp.arange(blk, dtype=jnp.int32)[None, :]  # [B, L]
    x = embed_block(dparams, dcfg, target_params, block_tokens)  # [B, L, D]

    def layer(x, xs):
        w, ck, cv = xs  # ck, cv [B, K, S, H]
        return draft_layer(w, dcfg, x, positions, lambda q, k, v: draft_attention(q, ck, cv, ctx_len, k, v)), None

    x, _ = scan_layers(layer, x, (dparams["layers"], ctx_k, ctx_v))  # [B, L, D]
    return draft_head(dparams, dcfg, target_params, x[:, 1:])  # [B, L-1, V or V_d]


def draft_to_target_ids(dparams: Params, ids: jax.Array) -> jax.Array:
    """Maps draft-vocabulary ids to target ids (the identity for a full-vocabulary drafter)."""
    d2t = dparams.get("d2t")
    return ids if d2t is None else jnp.take(d2t, ids)
