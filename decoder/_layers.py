"""Building blocks shared by the target transformer and the DFlash drafter."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dflash_batch.decoder._config import TargetConfig


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out], accumulated in float32 and rounded once to x's dtype."""
    return jnp.matmul(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm with its statistics, and the scaling by its weight, in float32; the result in x's dtype."""
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


def swiglu(x: jax.Array, gate_up: jax.Array, down: jax.Array) -> jax.Array:
    """SwiGLU MLP with the gate and up projections fused: gate_up [D, 2F], down [F, D]."""
    gu = dense(x, gate_up)  # [B, T, 2F]
    gate, up = jnp.split(gu, 2, axis=-1)
    return dense(jax.nn.silu(gate) * up, down)


def qkv_proj(x: jax.Array, w: dict, q_cols: int, kv_cols: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [.., N H], k and v [.., K H] from a layer's fused ``qkv`` [D, (N + 2K) H], or from its
    separate ``q``, ``k``, ``v`` (the tensor-parallel layout, where each chip holds whole heads)."""
    if "qkv" in w:
        return tuple(jnp.split(dense(x, w["qkv"]), [q_cols, q_cols + kv_cols], axis=-1))
    return dense(x, w["q"]), dense(x, w["k"]), dense(x, w["v"])


def mlp(x: jax.Array, w: dict) -> jax.Array:
    """A layer's SwiGLU MLP, fused (``gate_up``) or in the tensor-parallel layout (``gate``, ``up``)."""
    if "gate_up" in w:
        return swiglu(x, w["gate_up"], w["down"])
    return dense(jax.nn.silu(dense(x, w["gate"])) * dense(x, w["up"]), w["down"])
