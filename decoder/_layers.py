"""Building blocks shared by the target transformer and the DFlash drafter."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dflash_batch.decoder._config import TargetConfig


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in fp32, as the reference implementations do."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: TargetConfig) -> jax.Array:
    """Inverse frequencies [H/2], including Llama-3 style frequency scaling."""
    half = cfg.head_dim // 2
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / cfg.head_dim))
    if cfg.rope_scaling is None:
        return inv
    s = dict(cfg.rope_scaling)
    factor = float(s["factor"])
    low = float(s.get("low_freq_factor", 1.0))
    high = float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates x [B, T, heads, H] by its absolute positions [B, T] (half-split layout)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention.

    q [B, T, K, G, H]; k, v [B, S, K, H]; mask [B, T, S] (True = may attend).
    Returns [B, T, K, G, H].
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    # A row whose mask is all False (a padded query) gets NaNs from softmax; zero them.
    probs = jnp.where(jnp.isnan(probs), 0.0, probs).astype(v.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)


def attend_cached(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, past: jax.Array,
                  k: jax.Array, v: jax.Array, causal: jax.Array) -> jax.Array:
    """Attention over [cache rows ; the block's own rows] without concatenating them.

    q [B, T, K, G, H]; k_cache, v_cache [B, K, S, H] with ``past`` [B, 1, S] marking
    the rows before the block; k, v [B, T, K, H] with ``causal`` [1, T, T].
    One softmax spans both parts, so the result equals attention over the concatenation.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    s_c = jnp.einsum("BTKGH,BKSH->BKGTS", q, k_cache, preferred_element_type=jnp.float32) * scale
    s_n = jnp.einsum("BTKGH,BUKH->BKGTU", q, k, preferred_element_type=jnp.float32) * scale
    s_c = jnp.where(past[:, None, None], s_c, -jnp.inf)
    s_n = jnp.where(causal[:, None, None], s_n, -jnp.inf)
    m = jnp.maximum(jnp.max(s_c, axis=-1, keepdims=True), jnp.max(s_n, axis=-1, keepdims=True))
    p_c, p_n = jnp.exp(s_c - m), jnp.exp(s_n - m)
    denom = jnp.sum(p_c, axis=-1, keepdims=True) + jnp.sum(p_n, axis=-1, keepdims=True)
    out = (jnp.einsum("BKGTS,BKSH->BTKGH", p_c.astype(v_cache.dtype), v_cache)
           + jnp.einsum("BKGTU,BUKH->BTKGH", p_n.astype(v.dtype), v))
    return out / jnp.moveaxis(denom, (1, 2, 3), (2, 3, 1))


def swiglu(x: jax.Array, gate_up: jax.Array, down: jax.Array) -> jax.Array:
    """SwiGLU MLP with the gate and up projections fused: gate_up [D, 2F], down [F, D]."""
    gu = x @ gate_up  # [B, T, 2F]
    gate, up = jnp.split(gu, 2, axis=-1)
    return (jax.nn.silu(gate) * up) @ down
