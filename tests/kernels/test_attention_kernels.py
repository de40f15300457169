"""Verify and draft attention: references vs hand computation, Pallas kernels (interpret
mode) vs references, dispatch, and a full-size run on a TPU when there is one.

Ladder (STYLE "Kernels"): 1. reference vs hand-computed cases; 2. kernel in interpret
mode vs reference at tiny shapes (CPU); 3. full size on an accelerator, skipped without.
Every query row of the output is a real row; the padding is the cache rows at or past
each sequence's length, which the tests fill with NaN so that any leak shows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from dflash_batch import kernels
from dflash_batch.kernels import (DraftBlockSizes, VerifyBlockSizes, draft_attention, reference_draft_attention,
                                  reference_verify_attention, use_attention_impl, verify_attention)

OPS = {
    "verify": (verify_attention, reference_verify_attention, VerifyBlockSizes, True),
    "draft": (draft_attention, reference_draft_attention, DraftBlockSizes, False),
}
TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _inputs(seed, b, t, k, g, h, s, lengths, dtype=jnp.float32, dead=np.nan):
    """Random q, caches [B, K, S, H] (rows >= length set to ``dead``), block k/v, lengths."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, k, g, h))
    kc, vc = rng.normal(size=(2, b, k, s, h))
    kn, vn = rng.normal(size=(2, b, t, k, h))
    for i, n in enumerate(lengths):
        kc[i, :, n:] = dead
        vc[i, :, n:] = dead
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return cast(q), cast(kc), cast(vc), jnp.asarray(lengths, jnp.int32), cast(kn), cast(vn)


def _naive(q, kc, vc, lengths, kn, vn, causal):
    """Loops over rows, heads and queries: softmax over [valid cache rows; visible block rows]."""
    q, kc, vc, kn, vn = (np.asarray(x, np.float64) for x in (q, kc, vc, kn, vn))
    b, t, k, g, h = q.shape
    out = np.zeros_like(q)
    for bi in range(b):
        n = int(lengths[bi])
        for kh in range(k):
            for ti in range(t):
                seen = ti + 1 if causal else t
                keys = np.concatenate([kc[bi, kh, :n], kn[bi, :seen, kh]])
                vals = np.concatenate([vc[bi, kh, :n], vn[bi, :seen, kh]])
                for gi in range(g):
                    sc = keys @ q[bi, ti, kh, gi] / math.sqrt(h)
                    p = np.exp(sc - sc.max())
                    out[bi, ti, kh, gi] = (p / p.sum()) @ vals
    return out


# ---- 1. references against hand computation ----------------------------------------------------

def test_references_average_the_visible_rows_for_zero_queries():
    """q = 0 makes every visible key equally likely: the output is the mean of the visible values."""
    b, t, k, g, h, s = 2, 3, 1, 2, 2, 4
    q = jnp.zeros((b, t, k, g, h))
    kc = jnp.ones((b, k, s, h))
    vc = jnp.broadcast_to(jnp.arange(s, dtype=jnp.float32)[None, None, :, None] * 10, (b, k, s, h))
    vc = vc.at[:, :, 2:].set(jnp.nan)  # rows past either length
    kn = jnp.ones((b, t, k, h))
    vn = jnp.broadcast_to(jnp.asarray([1.0, 2.0, 3.0])[None, :, None, None], (b, t, k, h))
    lengths = jnp.asarray([0, 2])
    # verify: row 0 sees block 0..t; row 1 also sees cache values 0 and 10
    want_v = np.array([[1.0, 1.5, 2.0], [(0 + 10 + 1) / 3, (0 + 10 + 1 + 2) / 4, (0 + 10 + 1 + 2 + 3) / 5]])
    # draft: every query sees the whole block
    want_d = np.array([[2.0] * 3, [(0 + 10 + 1 + 2 + 3) / 5] * 3])
    for fn, want in ((reference_verify_attention, want_v), (reference_draft_attention, want_d)):
        out = np.asarray(fn(q, kc, vc, lengths, kn, vn))
        np.testing.assert_allclose(out, np.broadcast_to(want[:, :, None, None, None], out.shape), rtol=1e-6)


@pytest.mark.parametrize("op", ["verify", "draft"])
def test_reference_matches_naive_loops(op):
    _, ref, _, causal = OPS[op]
    args = _inputs(0, b=3, t=4, k=2, g=3, h=8, s=6, lengths=[0, 3, 6])
    want = _naive(*args, causal=causal)
    np.testing.assert_allclose(np.asarray(ref(*args)), want, atol=1e-5, rtol=1e-5)
    # the other cache layout gives the same result
    q, kc, vc, lengths, kn, vn = args
    bskh = ref(q, kc.swapaxes(1, 2), vc.swapaxes(1, 2), lengths, kn, vn, cache_layout="BSKH")
    np.testing.assert_allclose(np.asarray(bskh), want, atol=1e-5, rtol=1e-5)


# ---- 2. Pallas kernels in interpret mode against the references ---------------------------------

_ref_jit = {name: jax.jit(ref, static_argnames=("cache_layout", "out_dtype")) for name, (_, ref, _, _) in OPS.items()}

# (op, G, T, S, lengths, dtype, kv heads per grid step): group sizes 1/3/8 and blocks
# 1/8/16 for each op; lengths ragged, 0 included, on and off the tile size 8, and the
# full cache; K = 2 kv heads, both in one grid step or one per step.
CASES = [
    ("verify", 1, 1, 13, [0, 1, 8, 13], jnp.float32, None),
    ("verify", 1, 16, 21, [5, 0, 16, 21], jnp.float32, 1),
    ("verify", 3, 8, 21, [0, 7, 9, 21], jnp.float32, None),
    ("verify", 8, 16, 40, [39, 0, 17, 8], jnp.float32, None),
    ("verify", 8, 1, 19, [3, 19, 0, 11], jnp.float32, 1),
    ("verify", 3, 16, 24, [24, 15, 0, 1], jnp.bfloat16, None),
    ("draft", 1, 8, 13, [0, 13, 4, 9], jnp.float32, 1),
    ("draft", 3, 16, 40, [40, 0, 23, 33], jnp.float32, None),
    ("draft", 8, 1, 21, [1, 20, 0, 8], jnp.float32, None),
    ("draft", 8, 16, 19, [0, 19, 12, 16], jnp.bfloat16, 1),
]


@pytest.mark.parametrize("op,g,t,s,lengths,dtype,kb", CASES,
                         ids=[f"{c[0]}-G{c[1]}-T{c[2]}-S{c[3]}-{jnp.dtype(c[5]).name}-kb{c[6]}" for c in CASES])
def test_kernel_matches_reference_in_interpret_mode(op, g, t, s, lengths, dtype, kb):
    fn, _, sizes, _ = OPS[op]
    seed = CASES.index((op, g, t, s, lengths, dtype, kb))
    args = _inputs(seed, b=len(lengths), t=t, k=2, g=g, h=16, s=s, lengths=lengths, dtype=dtype)
    out = fn(*args, block_sizes=sizes(block_s=8, block_kv_heads=kb), interpret=True, impl="interpret")
    want = _ref_jit[op](*args)
    assert out.shape == args[0].shape and out.dtype == jnp.dtype(dtype)
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), **TOL[dtype])
    if dtype == jnp.bfloat16:  # and close to the exact (fp32) answer on the same inputs
        exact = _ref_jit[op](*(x.astype(jnp.float32) if x.dtype == dtype else x for x in args))
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(exact), atol=5e-2, rtol=5e-2)


def _dots(jaxpr) -> list:
    """Every dot_general in a jaxpr, inner jaxprs (the pallas_call's kernel, scans) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple) else (v,):  # cond branches come as a tuple
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dots(inner)
    return found


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_bf16_inputs_are_accumulated_in_float32(op, impl):
    """XLA on CPU sums bf16 dots in float32 whatever it is asked; a TPU does what it is asked.
    So the request is checked: every dot of the kernel body and of the reference is float32."""
    fn, _, sizes, _ = OPS[op]
    args = _inputs(0, b=2, t=4, k=2, g=2, h=16, s=16, lengths=[3, 16], dtype=jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda *a: fn(*a, block_sizes=sizes(block_s=8), impl=impl))(*args).jaxpr
    dots = _dots(jaxpr)
    assert dots and all(d.params["preferred_element_type"] == jnp.float32 for d in dots)
    assert jax.eval_shape(lambda *a: fn(*a, impl=impl), *args).dtype == jnp.bfloat16


def test_kernel_with_seq_major_cache_one_tile_and_fp32_output():
    """cache_layout="BSKH", a tile larger than the cache (one tile), out_dtype != q.dtype."""
    q, kc, vc, lengths, kn, vn = _inputs(5, b=3, t=8, k=3, g=3, h=8, s=14, lengths=[14, 0, 6], dtype=jnp.bfloat16)
    out = verify_attention(q, kc.swapaxes(1, 2), vc.swapaxes(1, 2), lengths, kn, vn, cache_layout="BSKH",
                           block_sizes=VerifyBlockSizes(block_s=64), impl="interpret", out_dtype=jnp.float32)
    want = _ref_jit["verify"](q, kc, vc, lengths, kn, vn, out_dtype=jnp.float32)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), **TOL[jnp.bfloat16])


def test_kernel_under_tpu_interpreter_with_nan_filled_memory():
    """Pallas' TPU interpreter models TPU memory and fills uninitialised memory (the
    out-of-bounds tail of the last tile, S % block_s != 0) with NaN."""
    args = _inputs(6, b=3, t=8, k=2, g=3, h=16, s=21, lengths=[21, 0, 10])
    params = pltpu.InterpretParams(uninitialized_memory="nan")
    out = draft_attention(*args, block_sizes=DraftBlockSizes(block_s=8), interpret=params, impl="interpret")
    np.testing.assert_allclose(np.asarray(out), np.asarray(_ref_jit["draft"](*args)), **TOL[jnp.float32])


def test_lengths_are_clipped_to_the_cache():
    q, kc, vc, _, kn, vn = _inputs(7, b=2, t=1, k=1, g=1, h=8, s=9, lengths=[9, 9])
    want = _ref_jit["verify"](q, kc, vc, jnp.asarray([9, 0]), kn, vn)
    wild = jnp.asarray([100, -5])
    np.testing.assert_allclose(np.asarray(_ref_jit["verify"](q, kc, vc, wild, kn, vn)), np.asarray(want), atol=1e-6)
    out = verify_attention(q, kc, vc, wild, kn, vn, block_sizes=VerifyBlockSizes(block_s=8), impl="interpret")
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)


# ---- wrapper checks and dispatch ----------------------------------------------------------------

def test_wrapper_names_bad_shapes():
    q, kc, vc, lengths, kn, vn = _inputs(0, b=2, t=4, k=2, g=2, h=8, s=8, lengths=[1, 2])
    with pytest.raises(ValueError, match="block_s=12"):
        VerifyBlockSizes(block_s=12)
    with pytest.raises(ValueError, match="block_s=0"):
        DraftBlockSizes(block_s=0)
    with pytest.raises(ValueError, match="block_kv_heads=0"):
        DraftBlockSizes(block_kv_heads=0)
    with pytest.raises(ValueError, match="block_kv_heads=3 must divide"):
        verify_attention(q, kc, vc, lengths, kn, vn, block_sizes=VerifyBlockSizes(block_kv_heads=3), impl="interpret")
    with pytest.raises(ValueError, match="lengths.shape=\\(3,\\)"):
        verify_attention(q, kc, vc, jnp.zeros(3, jnp.int32), kn, vn, impl="reference")
    with pytest.raises(ValueError, match="k_new"):
        verify_attention(q, kc, vc, lengths, kn[:, :3], vn, impl="reference")
    with pytest.raises(ValueError, match="k_cache"):
        draft_attention(q, kc[:, :1], vc[:, :1], lengths, kn, vn, impl="reference")
    with pytest.raises(ValueError, match="v_cache.shape"):
        draft_attention(q, kc, vc[:, :, :5], lengths, kn, vn, impl="reference")
    with pytest.raises(ValueError, match="cache_layout='BHSK'"):
        draft_attention(q, kc, vc, lengths, kn, vn, cache_layout="BHSK")
    with pytest.raises(ValueError, match="lengths.dtype"):
        verify_attention(q, kc, vc, lengths.astype(jnp.float32), kn, vn, impl="reference")
    with pytest.raises(ValueError, match="impl='cuda'"):
        verify_attention(q, kc, vc, lengths, kn, vn, impl="cuda")


def test_dispatch_precedence(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.attention_impl() == ("pallas" if jax.default_backend() == "tpu" else "reference")
    monkeypatch.setenv(kernels.ENV_VAR, "interpret")
    assert kernels.attention_impl() == "interpret"
    with use_attention_impl("reference"):
        assert kernels.attention_impl() == "reference"
        assert kernels.attention_impl("pallas") == "pallas"  # an explicit argument wins
    assert kernels.attention_impl() == "interpret"
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    with pytest.raises(ValueError, match="DFLASH_BATCH_KERNELS"):
        kernels.attention_impl()
    with pytest.raises(ValueError, match="impl='fast'"):
        with use_attention_impl("fast"):
            pass


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="checks the refusal off TPU")
def test_compiled_pallas_is_refused_off_tpu():
    args = _inputs(0, b=1, t=2, k=1, g=1, h=8, s=8, lengths=[3])
    with pytest.raises(ValueError, match="needs a TPU"):
        verify_attention(*args, impl="pallas")


def test_dispatch_follows_the_context_when_impl_is_none(monkeypatch):
    """impl=None: the kernel path under "interpret", the reference under "reference"."""
    from dflash_batch.kernels import _block_attention, _dispatch, _selfcheck

    calls = []
    monkeypatch.setattr(_block_attention, "run_kernel", lambda q, *a, **kw: calls.append(kw["interpret"]) or q)
    # The dispatch alone: the stand-in kernel would fail its self-check (tests/kernels/test_decoder_with_kernels.py).
    monkeypatch.setattr(_dispatch, "self_check", lambda op, impl, reference: _selfcheck.SelfCheck(op, impl, "-", True,
                                                                                                 0.0, "-"))
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    args = _inputs(8, b=2, t=2, k=1, g=2, h=8, s=11, lengths=[11, 4])
    with use_attention_impl("interpret"):
        verify_attention(*args)
        draft_attention(*args)
    assert calls == [True, True]
    with use_attention_impl("reference"):
        out = draft_attention(*args)
    assert calls == [True, True] and out.shape == args[0].shape
    monkeypatch.setenv(kernels.ENV_VAR, "interpret")
    verify_attention(*args)
    assert len(calls) == 3
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    verify_attention(*args, interpret=True)  # interpret=True asks for the kernel...
    assert len(calls) == 4
    verify_attention(*args, interpret=True, impl="reference")  # ...unless impl says otherwise
    assert len(calls) == 4


@pytest.mark.parametrize("op", ["verify", "draft"])
@pytest.mark.parametrize("k,g,h,dtype,kb", [(3, 3, 64, jnp.bfloat16, None), (8, 4, 128, jnp.bfloat16, 2),
                                            (2, 8, 16, jnp.float32, None)],
                         ids=["smollm2-135m", "qwen3-8b", "tiny-fp32"])
def test_kernel_lowers_to_mosaic_for_tpu(op, k, g, h, dtype, kb):
    """Pallas' TPU lowering (block shapes, index maps, kernel body -> Mosaic MLIR) runs on
    CPU through jax.export. Mosaic's own compiler (in libtpu) does not: that needs a TPU."""
    from dflash_batch.kernels import _draft_attention, _verify_attention

    pallas = {"verify": (_verify_attention._verify_attention_pallas, VerifyBlockSizes),
              "draft": (_draft_attention._draft_attention_pallas, DraftBlockSizes)}[op]
    b, t, s = 4, 16, 2000  # s not a multiple of the tile
    shapes = [((b, t, k, g, h), dtype), ((b, k, s, h), dtype), ((b, k, s, h), dtype), ((b,), jnp.int32),
              ((b, t, k, h), dtype), ((b, t, k, h), dtype)]
    fn = jax.jit(lambda *a: pallas[0](*a, block_sizes=pallas[1](block_kv_heads=kb), cache_layout="BKSH",
                                      interpret=False, out_dtype=jnp.dtype(dtype)))
    exported = jax.export.export(fn, platforms=["tpu"])(*(jax.ShapeDtypeStruct(*x) for x in shapes))
    assert "tpu_custom_call" in exported.mlir_module()


# ---- 3. full size on an accelerator -------------------------------------------------------------

@pytest.mark.skipif(jax.default_backend() != "tpu",
                    reason="no TPU: the kernels are Mosaic TPU kernels (GPU and CPU run the reference)")
@pytest.mark.parametrize("op", ["verify", "draft"])
@pytest.mark.parametrize("k,g,h", [(3, 3, 64), (8, 4, 128)], ids=["smollm2-135m", "qwen3-8b"])
def test_full_size_on_tpu(op, k, g, h):
    fn, ref, sizes, _ = OPS[op]
    b, t, s = 8, 16, 4096
    lengths = [0, 1, 511, 512, 513, 2047, 4000, 4096]
    args = _inputs(9, b=b, t=t, k=k, g=g, h=h, s=s, lengths=lengths, dtype=jnp.bfloat16)
    out = jax.jit(lambda *a: fn(*a, block_sizes=sizes(), impl="pallas"))(*args)
    want = jax.jit(lambda *a: ref(*(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in a)))(*args)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want), atol=5e-2, rtol=5e-2)

