"""The target transformer (Llama and Qwen3 families) as pure JAX functions.

Parameters are a pytree of arrays with the layers stacked on a leading axis, so
the forward pass is one ``lax.scan`` over layers: compile time does not grow with
depth. Projections are stored [in, out] and fused (q|k|v, gate|up) at load time.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from dflash_batch.decoder._cache import KVCache
from dflash_batch.decoder._config import TargetConfig
from dflash_batch.decoder._layers import (apply_rope, dense, matmul_rows, mlp, qkv_proj, rms_norm, rope_inv_freq,
                                          scan_layers, take_layer, take_layers)
from dflash_batch.kernels import verify_attention

Params = dict[str, Any]


def embed(params: Params, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> [B, T, D] (gathered as raw bits when bf16: see ``take_layer``)."""
    table = params["embed"]
    return take_layer(table, tokens)


def lm_head(params: Params, x: jax.Array) -> jax.Array:
    """x [..., D] -> logits [..., V] in fp32 (tied embeddings when there is no lm_head)."""
    w = params.get("lm_head")
    if w is None:
        return matmul_rows(x, params["embed"], "...D,VD->...V")
    return matmul_rows(x, w, "...D,DV->...V")


def head_rows(params: Params, ids=None) -> jax.Array:
    """The output head's rows [V', D] for token ``ids`` [V'] (every token when None), so that
    ``lm_head(params, x)[..., ids] == x @ head_rows(params, ids).T``."""
    w = params.get("lm_head")
    rows = params["embed"] if w is None else w.T
    return rows if ids is None else jnp.take(rows, jnp.asarray(ids), axis=0)


def final_norm(params: Params, cfg: TargetConfig, x: jax.Array) -> jax.Array:
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps)


def write_rows(cache: jax.Array, new: jax.Array, positions: jax.Array, slot: jax.Array | None = None) -> jax.Array:
    """Scatters new rows [layers, B, T, K, H] into a [layers, B', K, S, H] cache at positions [B, T].

    Rows go to cache batch rows 0..B-1, or (B = 1) to row ``slot``. Out-of-range
    positions are dropped. One scatter per pass, in place on a donated buffer.
    """
    _, b, t, k, _ = new.shape
    rows = jnp.arange(b)[:, None, None] if slot is None else jnp.full((1, 1, 1), slot)  # [B, 1, 1]
    heads = jnp.arange(k)[None, :, None]  # [1, K, 1]
    vals = jnp.moveaxis(new, 2, 3).astype(cache.dtype)  # [layers, B, K, T, H]
    return cache.at[:, rows, heads, positions[:, None, :]].set(vals, mode="drop")


def target_layer(w: Params, cfg: TargetConfig, x: jax.Array, positions: jax.Array, attend) -> tuple[jax.Array, ...]:
    """One pre-norm layer over new rows x [B, T, D] at ``positions`` [B, T].

    ``attend(q [B, T, K, G, H], k [B, T, K, H], v) -> o [B, T, K, G, H]`` says what else the
    rows see (a KV cache, or nothing). Returns (x, k, v): the layer's output and the rows'
    keys (after q/k norm and RoPE) and values, for the cache.
    """
    bsz, t, _ = x.shape
    n_kv, g, h = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    inv_freq = rope_inv_freq(cfg)
    hn = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
    q, k, v = qkv_proj(hn, w, cfg.num_heads * h, n_kv * h)  # [B, T, N H], [B, T, K H] x 2
    q = q.reshape(bsz, t, cfg.num_heads, h)
    k = k.reshape(bsz, t, n_kv, h)
    v = v.reshape(bsz, t, n_kv, h)
    if cfg.qk_norm:
        q = rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    o = attend(q.reshape(bsz, t, n_kv, g, h), k, v)  # [B, T, K, G, H]
    x = x + dense(o.reshape(bsz, t, cfg.num_heads * h), w["o"])
    x = x + mlp(rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps), w)
    return x, k, v


def forward(
    params: Params,
    cfg: TargetConfig,
    tokens: jax.Array,
    start: jax.Array,
    cache: KVCache,
    *,
    slot: jax.Array | None = None,
    logits_at: jax.Array | None = None,
    collect_layers: Sequence[int] = (),
) -> tuple[jax.Array, jax.Array | None, KVCache]:
    """Runs the target over a block of new tokens and appends their K/V to the cache.

    Steps:
      1. Embed tokens [B, T]; token t of row b sits at absolute position start[b] + t.
      2. Per layer (``target_layer``): each query attends to its row's cache rows before
         ``start`` and, causally, to the block's own keys. The cache is only read inside the
         layer loop, so no per-layer copy of it is ever made.
      3. After the last layer, write the block's K/V of every layer into the cache
         in one in-place scatter (rows start..start+T-1).
      4. Final norm and lm_head, on every position or only at ``logits_at`` [B].

    With ``slot`` set, B is 1 and the block belongs to the sequence in cache row
    ``slot`` (a prompt chunk of one request being prefilled into a running batch).

    Returns (logits [B, T or 1, V], hidden states after ``collect_layers`` as
    [B, T, len(collect_layers), D] or None, the updated cache).
    """
    t = tokens.shape[1]  # T
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    x = embed(params, tokens)  # [B, T, D]

    def layer(x, xs):
        w, idx = xs  # the layer's weights and its index in the cache
        if slot is None:
            k_cache, v_cache = take_layers([cache.k, cache.v], idx)  # [B, K, S, H]
        else:
            k_cache, v_cache = (c[None] for c in take_layers([cache.k, cache.v], (idx, slot)))
        # Cache rows < start, then the block causally: kernels/ picks Pallas or plain jnp.
        x, k, v = target_layer(w, cfg, x, positions,
                               lambda q, k, v: verify_attention(q, k_cache, v_cache, start, k, v))
        return x, (k, v, x if collect_layers else None)

    layer_ids = jnp.arange(cfg.num_layers)
    x, (k_new, v_new, hidden) = scan_layers(layer, x, (params["layers"], layer_ids))  # k_new [layers, B, T, K, H]
    kc = write_rows(cache.k, k_new, positions, slot)
    vc = write_rows(cache.v, v_new, positions, slot)
    feats = None
    if collect_layers:
        # hidden [layers, B, T, D] -> the chosen layers' outputs, [B, T, n_f, D]
        feats = jnp.moveaxis(hidden[jnp.asarray(collect_layers)], 0, 2)
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)  # [B, 1, D]
    logits = lm_head(params, final_norm(params, cfg, x))
    return logits, feats, KVCache(k=kc, v=vc)


def hidden_states(params: Params, cfg: TargetConfig, tokens: jax.Array, collect_layers: Sequence[int]) -> jax.Array:
    """The outputs of layers ``collect_layers`` [B, S, n, D] over whole sequences tokens [B, S]
    from position 0, causal, with no KV cache and no output head: the features drafter
    training reads (online and offline alike).

    The same ``target_layer`` as decoding, attending through ``verify_attention`` with a
    one-row cache of length 0 (nothing before the block), so the features are computed
    exactly as a prefill computes them.
    """
    bsz, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (bsz, s))  # [B, S]
    nothing = jnp.zeros((bsz, cfg.num_kv_heads, 1, cfg.head_dim), cfg.dtype)  # [B, K, 1, H], never read
    start = jnp.zeros((bsz,), jnp.int32)

    def layer(x, w):
        x, _, _ = target_layer(w, cfg, x, positions, lambda q, k, v: verify_attention(q, nothing, nothing, start, k, v))
        return x, x

    _, hidden = scan_layers(layer, embed(params, tokens), params["layers"])  # [layers, B, S, D]
    return jnp.moveaxis(hidden[jnp.asarray(tuple(collect_layers))], 0, 2)  # [B, S, n, D]
