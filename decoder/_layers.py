"""Building blocks shared by the target transformer and the DFlash drafter."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dflash_batch.decoder._config import TargetConfig
from dflash_batch.kernels._ordered_sum import ordered_sum


def matmul_rows(x: jax.Array, w: jax.Array, spec: str = "...D,DF->...F") -> jax.Array:
    """``einsum(spec, x, w)`` accumulated in float32, computed as at least two rows.

    Why two: XLA's CPU backend multiplies a single row by a matrix-vector routine that sums in
    another order than its matrix-matrix routine, which every call of two or more rows uses
    (measured: equal bits for 2 to 2048 rows, last-bit differences for 1). So a 1-token AR step
    at batch 1 and an L-token verify pass would round differently, and in bfloat16 a last-bit
    difference can become a whole bf16 step that 30 layers grow into another token. The
    single-row routine is also 30x slower in bf16. A duplicated row costs nothing measurable.
    """
    lead = x.shape[:-1]
    if math.prod(lead) != 1:
        return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
    two = jnp.broadcast_to(x.reshape(1, x.shape[-1]), (2, x.shape[-1]))  # [2, D]: the row twice
    out = jnp.einsum(spec, two, w, preferred_element_type=jnp.float32)  # [2, F]
    return out[0].reshape(lead + out.shape[-1:])


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out], accumulated in float32 and rounded once to x's dtype."""
    return matmul_rows(x, w.astype(x.dtype)).astype(x.dtype)


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def _unbits(x: jax.Array, dtype) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if dtype == jnp.bfloat16 else x


_SWITCH_MIN_BYTES = 1 << 18  # smaller bf16 layers are sliced as bits: their copy costs less than the compile


def _switch_layers(stack: jax.Array) -> bool:
    """Whether layers of ``stack`` are picked by ``lax.switch`` over static slices: bf16 layers of
    at least 256 KiB, on XLA's CPU backend.

    There, a dynamic slice of a 16-bit array is copied element by element (and a bfloat16 one is
    first converted WHOLE to float32), while a static slice is a block copy. Measured on 30
    stacked [576, 3072] bf16 layers at 16 rows: 108 ms through a dynamic slice, 17 ms through a
    switch of static slices, against 60 ms for the same float32 chain. The price is compile
    time (a SmolLM2 forward: 2.4 s against 0.6 s), hence the size floor. A TPU slices bf16
    natively, so accelerators keep the plain slice (and a smaller program).
    """
    layer_bytes = stack.dtype.itemsize * stack.size // max(stack.shape[0], 1)
    return stack.dtype == jnp.bfloat16 and layer_bytes >= _SWITCH_MIN_BYTES and jax.default_backend() == "cpu"


def _pick_layer(stacks: list[jax.Array], layer) -> list[jax.Array]:
    """``[s[layer] for s in stacks]`` as one switch over the layers' static slices (of the raw
    bits: a static bf16 slice would still convert the whole stack to float32 in the HLO)."""
    n = stacks[0].shape[0]
    return jax.lax.switch(layer, [lambda j=j: [_unbits(_bits(s)[j], s.dtype) for s in stacks] for j in range(n)])


def take_layer(stack: jax.Array, index) -> jax.Array:
    """``stack[index]``: a layer of a stacked array (``index`` a scalar), ``stack[layer, j]``, or
    rows gathered by an index array; bf16 without the slow paths of XLA's CPU backend.

    On CPU a large bf16 layer comes from a switch over static slices (``_switch_layers``). Anything
    else bf16 is sliced as uint16 bits and bitcast back: XLA's CPU backend would otherwise
    convert the WHOLE array to float32 first, on every call (every layer's weights or the whole
    KV cache). On a TPU the bitcast is free.
    """
    (layer,) = take_layers([stack], index)
    return layer


def take_layers(stacks: list[jax.Array], index) -> list[jax.Array]:
    """``take_layer`` of several stacks at one index, the switched ones through ONE switch (a
    switch per stack would compile its branches once per stack)."""
    layer, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
    switched = [s for s in stacks if _switch_layers(s)] if jnp.ndim(layer) == 0 else []
    picked = iter(_pick_layer(switched, layer) if switched else [])
    out = []
    for s in stacks:
        if switched and _switch_layers(s):
            p = next(picked)
            out.append(_unbits(_bits(p)[rest], p.dtype) if rest else p)
        else:
            out.append(_unbits(_bits(s)[index], s.dtype))
    return out


def scan_layers(f, init, xs):
    """``jax.lax.scan(f, init, xs)`` over stacked per-layer arrays, with bfloat16 leaves of ``xs``
    picked as ``take_layer`` does (a switch of static slices on CPU, raw bits elsewhere) and the
    stacked bf16 outputs carried as raw bits."""
    leaves, tree = jax.tree.flatten(xs)
    switched = [j for j, a in enumerate(leaves) if _switch_layers(a)]
    scanned = [j for j in range(len(leaves)) if j not in switched]
    out_dtypes = []

    def body(carry, x):
        i, sliced = x
        layer = dict(zip(switched, _pick_layer([leaves[j] for j in switched], i) if switched else []))
        layer.update((j, _unbits(a, leaves[j].dtype)) for j, a in zip(scanned, sliced))
        carry, y = f(carry, tree.unflatten([layer[j] for j in range(len(leaves))]))
        out_dtypes.append(jax.tree.map(lambda a: a.dtype, y))
        return carry, jax.tree.map(_bits, y)

    carry, ys = jax.lax.scan(body, init, (jnp.arange(leaves[0].shape[0]), [_bits(leaves[j]) for j in scanned]))
    return carry, jax.tree.map(_unbits, ys, out_dtypes[0])


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm with its statistics, and the scaling by its weight, in float32; the result in x's dtype."""
    x32 = x.astype(jnp.float32)
    # The mean of squares as a fixed-order sum: XLA's own reduction rounds differently
    # depending on how many rows the array has (see kernels/_ordered_sum.py).
    x32 = x32 * jax.lax.rsqrt(ordered_sum(x32 * x32) / x.shape[-1] + eps)
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
