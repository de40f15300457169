"""The Pallas kernel body shared by verify and draft attention.

Both ops attend T new queries per sequence to (a) the sequence's ragged cache rows
``< length[b]`` and (b) the block's own T keys, causally (verify) or not (draft), with
one softmax over both parts. They differ only in the block mask, so one kernel body
serves both; each op module keeps its own wrapper, ``pallas_call`` entry point and
plain-jnp reference (STYLE "Kernels").

Kernel layout ("heads-major", the decoder's KVCache layout; the wrappers convert q):
  q       [B, K, T*G, H]   the G query heads of a kv head folded into the rows, so a
                           GQA group is one [T*G, H] x [H, tile] matmul;
  k/v new [B, K, T, H];
  k/v cache [B, K, S, H]   every head's tile is a plain [block_s, H] slab, reached by a
                           leading-axis index: no in-kernel lane or sublane slicing,
                           which Mosaic handles poorly (H = 64 in particular);
  lengths [B] int32        scalar-prefetched into SMEM.

Grid (B, K / block_kv_heads, n_s), n_s = cdiv(S, block_s); each step handles
block_kv_heads heads (a static loop) so that small heads still make big DMAs; the
tile axis is the reduction ("arbitrary").
  * step 0 initialises the online softmax with the block's own keys; every query row
    sees at least itself (causal) or all T keys (draft), so the running max is finite
    from the start and fully-masked rows never arise;
  * step i folds in cache tile i only if ``i * block_s < length``; tiles past the
    length are neither computed nor fetched (their index map repeats the last valid
    tile, so the pipeline skips the DMA);
  * inside a straddling tile, columns >= length are masked in the scores and their V
    rows zeroed: rows past the length, and the out-of-bounds tail of a last tile when
    S % block_s != 0, may hold anything (even NaN) and must not leak into the sum;
  * the last step divides by the softmax denominator and writes the output.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_NT = (((1,), (1,)), ((), ()))  # dot_general dims for x @ y.T


def _kernel(lengths_ref, q_ref, kn_ref, vn_ref, kc_ref, vc_ref, o_ref, m_ref, l_ref, acc_ref,
            *, causal: bool, group: int, block_s: int, heads: int, scale: float):
    b = pl.program_id(0)
    i = pl.program_id(2)
    length = lengths_ref[b]
    tg, h = q_ref.shape[1:]
    t = kn_ref.shape[1]

    @pl.when(i == 0)
    def _block_keys():
        if causal:  # folded row r = t * G + g may see block key u <= t, i.e. u * G <= r (no vector divide)
            row = lax.broadcasted_iota(jnp.int32, (tg, t), 0)
            col = lax.broadcasted_iota(jnp.int32, (tg, t), 1)
            visible = col * group <= row
        for j in range(heads):
            v = vn_ref[j]  # [T, H]
            s = lax.dot_general(q_ref[j], kn_ref[j], _NT, preferred_element_type=jnp.float32) * scale  # [TG, T]
            if causal:
                s = jnp.where(visible, s, -jnp.inf)
            m = jnp.max(s, axis=1, keepdims=True)  # [TG, 1], finite
            p = jnp.exp(s - m)
            m_ref[j] = m
            l_ref[j] = jnp.sum(p, axis=1, keepdims=True)
            acc_ref[j] = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)

    @pl.when(i * block_s < length)
    def _cache_tile():
        start = i * block_s
        col_ok = start + lax.broadcasted_iota(jnp.int32, (tg, block_s), 1) < length  # [TG, bs]
        row_ok = start + lax.broadcasted_iota(jnp.int32, (block_s, h), 0) < length  # [bs, H]
        for j in range(heads):
            v = vc_ref[j]  # [bs, H]
            v = jnp.where(row_ok, v, jnp.zeros_like(v))
            s = lax.dot_general(q_ref[j], kc_ref[j], _NT, preferred_element_type=jnp.float32) * scale  # [TG, bs]
            s = jnp.where(col_ok, s, -jnp.inf)
            m_prev = m_ref[j]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_next)
            p = jnp.exp(s - m_next)
            l_ref[j] = alpha * l_ref[j] + jnp.sum(p, axis=1, keepdims=True)
            acc_ref[j] = alpha * acc_ref[j] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            m_ref[j] = m_next

    @pl.when(i == pl.num_programs(2) - 1)
    def _finish():
        for j in range(heads):
            o_ref[j] = (acc_ref[j] / l_ref[j]).astype(o_ref.dtype)


def effective_block_s(block_s: int, s: int) -> int:
    """The cache tile actually used: the whole cache when it fits in one tile."""
    return s if s <= block_s else block_s


def effective_block_kv_heads(block_kv_heads: int | None, k_heads: int) -> int:
    """KV heads per grid step: all of them by default."""
    return k_heads if block_kv_heads is None else block_kv_heads


def block_attention_pallas(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                           k_new: jax.Array, v_new: jax.Array, *, causal: bool, group: int,
                           block_s: int, block_kv_heads: int | None, interpret, out_dtype,
                           name: str) -> jax.Array:
    """The pallas_call, in kernel layout (see the module docstring); shapes already checked.

    Returns [B, K, T*G, H] in ``out_dtype``.
    """
    bsz, k_heads, tg, h = q.shape
    s = k_cache.shape[2]
    t = k_new.shape[2]
    bs = effective_block_s(block_s, s)
    kb = effective_block_kv_heads(block_kv_heads, k_heads)
    n_s = pl.cdiv(s, bs)

    def per_row(b, hb, i, lens):
        return b, hb, 0, 0

    def cache_tile(b, hb, i, lens):
        # lax.div (truncating) rather than //: lengths are >= 0, and floor division lowers
        # through sign(), which Pallas' TPU lowering rejects on the scalar core.
        last = jnp.maximum(lax.div(lens[b] + (bs - 1), bs) - 1, 0)  # last tile holding a valid row
        return b, hb, jnp.minimum(i, last), 0

    q_spec = pl.BlockSpec((None, kb, tg, h), per_row)
    new_spec = pl.BlockSpec((None, kb, t, h), per_row)
    cache_spec = pl.BlockSpec((None, kb, bs, h), cache_tile)
    kernel = functools.partial(_kernel, causal=causal, group=group, block_s=bs, heads=kb,
                               scale=1.0 / math.sqrt(h))
    itemsize = jnp.dtype(k_cache.dtype).itemsize
    cost = pl.CostEstimate(
        flops=4 * bsz * k_heads * tg * (s + t) * h,
        transcendentals=bsz * k_heads * tg * (s + t),
        bytes_accessed=(2 * bsz * k_heads * (s + t) * h * itemsize
                        + 2 * q.size * jnp.dtype(q.dtype).itemsize),
    )
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(bsz, k_heads // kb, n_s),
            in_specs=[q_spec, new_spec, new_spec, cache_spec, cache_spec],
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((kb, tg, 1), jnp.float32),  # running max
                pltpu.VMEM((kb, tg, 1), jnp.float32),  # running denominator
                pltpu.VMEM((kb, tg, h), jnp.float32),  # running numerator
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((bsz, k_heads, tg, h), out_dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
        name=name,
    )(lengths, q, k_new, v_new, k_cache, v_cache)


# ---- layout plumbing and checks shared by the two public wrappers -------------------------------

CACHE_LAYOUTS = ("BSKH", "BKSH")


def check_inputs(op: str, q, k_cache, v_cache, lengths, k_new, v_new, cache_layout: str) -> None:
    """Raises ValueError naming the offending values when shapes or dtypes disagree."""
    if cache_layout not in CACHE_LAYOUTS:
        raise ValueError(f"{op}: {cache_layout=} must be one of {CACHE_LAYOUTS}")
    if q.ndim != 5:
        raise ValueError(f"{op}: q must be [B, T, K, G, H]; got {q.shape=}")
    bsz, t, k_heads, g, h = q.shape
    if t < 1:
        raise ValueError(f"{op}: the block needs at least one query; got {q.shape=}")
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if x.shape != (bsz, t, k_heads, h):
            raise ValueError(f"{op}: {name} must be [B, T, K, H] = {(bsz, t, k_heads, h)} "
                             f"to match {q.shape=}; got {name}.shape={x.shape}")
    if k_cache.ndim != 4:
        raise ValueError(f"{op}: k_cache must be rank 4 ({cache_layout}); got {k_cache.shape=}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: {k_cache.shape=} and {v_cache.shape=} differ")
    if cache_layout == "BSKH":
        cb, _, ck, ch = k_cache.shape
    else:
        cb, ck, _, ch = k_cache.shape
    if (cb, ck, ch) != (bsz, k_heads, h):
        raise ValueError(f"{op}: k_cache ({cache_layout}) {k_cache.shape=} does not match "
                         f"{q.shape=} in B, K or H")
    if lengths.shape != (bsz,):
        raise ValueError(f"{op}: lengths must be [B] = ({bsz},); got {lengths.shape=}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{op}: lengths must be integers; got {lengths.dtype=}")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new),
                    ("v_new", v_new)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{op}: {name} must be floating point; got {name}.dtype={x.dtype}")


def to_bksh(cache: jax.Array, cache_layout: str) -> jax.Array:
    """A cache in the kernel's heads-major layout [B, K, S, H] (a copy only for "BSKH")."""
    return cache if cache_layout == "BKSH" else jnp.swapaxes(cache, 1, 2)


def run_kernel(q, k_cache, v_cache, lengths, k_new, v_new, *, causal: bool, block_s: int,
               block_kv_heads: int | None, cache_layout: str, interpret, out_dtype, name: str) -> jax.Array:
    """Decoder layout in, decoder layout out, via the kernel layout.

    q [B, T, K, G, H]; caches in ``cache_layout``; k/v new [B, T, K, H] -> [B, T, K, G, H].
    A "BKSH" cache (the decoder's) goes to the kernel as is; a "BSKH" one is transposed
    here, one copy of the cache per call. q and the block's k/v are small and are
    transposed in any case.
    """
    bsz, t, k_heads, g, h = q.shape
    k_cache, v_cache = to_bksh(k_cache, cache_layout), to_bksh(v_cache, cache_layout)  # [B, K, S, H]
    s = k_cache.shape[2]
    if s < 1:
        raise ValueError(f"{name}: the Pallas kernel needs a cache of at least one row; got {s=}")
    if block_kv_heads is not None and k_heads % block_kv_heads:
        raise ValueError(f"{name}: {block_kv_heads=} must divide the number of kv heads K={k_heads}")
    qk = jnp.transpose(q, (0, 2, 1, 3, 4)).reshape(bsz, k_heads, t * g, h)  # [B, K, T*G, H]
    kn = jnp.swapaxes(k_new, 1, 2)  # [B, K, T, H]
    vn = jnp.swapaxes(v_new, 1, 2)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, s)
    out = block_attention_pallas(qk, k_cache, v_cache, lengths, kn, vn, causal=causal, group=g,
                                 block_s=block_s, block_kv_heads=block_kv_heads, interpret=interpret,
                                 out_dtype=out_dtype, name=name)
    return jnp.transpose(out.reshape(bsz, k_heads, t, g, h), (0, 2, 1, 3, 4))  # [B, T, K, G, H]


def reference_block_attention(q, k_cache, v_cache, lengths, k_new, v_new, block_mask, out_dtype):
    """One softmax over [cache rows < length ; the block's own rows], the cache mask built from lengths; caches [B, K, S, H].

    block_mask [T, T] (True = may attend). One softmax spans cache and block; p is cast
    to V's dtype before the PV product, as the decoder's attention does.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    s_len = k_cache.shape[2]
    past = jnp.arange(s_len)[None, :] < lengths[:, None]  # [B, S]
    s_c = jnp.einsum("BTKGH,BKSH->BKGTS", q, k_cache, preferred_element_type=jnp.float32) * scale
    s_n = jnp.einsum("BTKGH,BUKH->BKGTU", q, k_new, preferred_element_type=jnp.float32) * scale
    s_c = jnp.where(past[:, None, None, None, :], s_c, -jnp.inf)
    s_n = jnp.where(block_mask[None, None, None], s_n, -jnp.inf)
    m = jnp.maximum(jnp.max(s_c, axis=-1, keepdims=True), jnp.max(s_n, axis=-1, keepdims=True))
    p_c, p_n = jnp.exp(s_c - m), jnp.exp(s_n - m)
    denom = jnp.sum(p_c, axis=-1, keepdims=True) + jnp.sum(p_n, axis=-1, keepdims=True)  # [B, K, G, T, 1]
    # Rows past the length may hold anything, NaN included: zero them so 0 * NaN cannot leak.
    v_cache = jnp.where(past[:, None, :, None], v_cache, jnp.zeros((), v_cache.dtype))
    out = (jnp.einsum("BKGTS,BKSH->BKGTH", p_c.astype(v_cache.dtype), v_cache,
                      preferred_element_type=jnp.float32)
           + jnp.einsum("BKGTU,BUKH->BKGTH", p_n.astype(v_new.dtype), v_new,
                        preferred_element_type=jnp.float32))
    out = out / denom
    return jnp.transpose(out, (0, 3, 1, 2, 4)).astype(out_dtype)  # [B, T, K, G, H]
