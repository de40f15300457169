"""Numerics that do not depend on how many rows share a call, and bf16 layers sliced without
a float32 detour: what keeps bf16 AR and bf16 verification token-identical, and bf16 fast."""

from __future__ import annotations

import functools
import re

import pytest

import jax
import jax.numpy as jnp
import numpy as np

from dflash_batch.decoder import KVCache, forward, load_target
from tiny_models import make_tiny_checkpoint
from dflash_batch.decoder._layers import dense, matmul_rows, rms_norm, scan_layers, take_layer
from dflash_batch.kernels import reference_verify_attention


def test_a_row_gets_the_same_bits_alone_as_among_other_rows():
    """One row through ``dense`` (an AR step at batch 1) equals the same row inside a
    many-row call (a verify pass), bit for bit, in bf16 and in float32."""
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 576))
    w = jax.random.normal(jax.random.PRNGKey(1), (576, 1536)) * 0.05
    for dtype in (jnp.bfloat16, jnp.float32):
        xs, ws = x.astype(dtype), w.astype(dtype)
        many = np.asarray(jax.jit(dense)(xs, ws).astype(jnp.float32))
        for i in (0, 7):
            alone = np.asarray(jax.jit(dense)(xs[i:i + 1][None], ws).astype(jnp.float32))  # [1, 1, F]
            np.testing.assert_array_equal(alone[0, 0], many[i], err_msg=f"{dtype} row {i}")


def test_matmul_rows_keeps_the_shape_of_a_single_row():
    x, w = jnp.ones((1, 1, 8), jnp.bfloat16), jnp.ones((8, 3), jnp.bfloat16)
    assert matmul_rows(x, w).shape == (1, 1, 3) and matmul_rows(x[0, 0], w).shape == (3,)
    assert matmul_rows(x, w.T, "...D,VD->...V").shape == (1, 1, 3)


def test_layers_sliced_as_bits_equal_plain_slicing():
    stack = (jax.random.normal(jax.random.PRNGKey(2), (3, 4, 5))).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(take_layer(stack, 1), np.float32), np.asarray(stack[1], np.float32))

    def body(c, w):
        return c + w.sum(), (w * 2, c)

    got = scan_layers(body, jnp.float32(0), stack)
    want = jax.lax.scan(body, jnp.float32(0), stack)
    assert got[1][0].dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_large_bf16_layers_come_from_static_slices_and_equal_plain_slicing():
    """A bf16 stack of 512 KiB layers: ``take_layer`` and ``scan_layers`` give plain slicing's
    values, and on CPU the compiled scan slices it statically (no dynamic slice of a 16-bit
    stack, which XLA's CPU backend copies element by element: 6x slower on SmolLM2's MLP)."""
    stack = jax.random.normal(jax.random.PRNGKey(3), (3, 512, 512)).astype(jnp.bfloat16)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(jax.jit(take_layer)(stack, i), np.float32), np.asarray(stack[i], np.float32))

    def body(c, w):
        return c + w[:2, :2].astype(jnp.float32), w[0]

    got = jax.jit(lambda s: scan_layers(body, jnp.zeros((2, 2)), s))
    want = jax.lax.scan(body, jnp.zeros((2, 2)), stack)
    for a, b in zip(jax.tree.leaves(got(stack)), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    hlo = got.lower(stack).compile().as_text()
    assert not re.search(r"= (bf16|u16)\[1,512,512\]\S* dynamic-slice\(", hlo)


def test_the_bf16_forward_converts_no_stacked_array_to_float32(tiny_llama_dir):
    """XLA's CPU backend upcasts a dynamic slice or gather of a bf16 array by converting the
    whole array: every layer's weights, the KV cache or the embedding table, on every step."""
    model = load_target(str(tiny_llama_dir), dtype="bfloat16", with_tokenizer=False)
    cfg = model.config
    shape = (cfg.num_layers, 2, cfg.num_kv_heads, 32, cfg.head_dim)
    cache = KVCache(k=jnp.zeros(shape, jnp.bfloat16), v=jnp.zeros(shape, jnp.bfloat16))
    fn = jax.jit(lambda p, t, s, c: forward(p, cfg, t, s, c)[0])
    hlo = fn.lower(model.params, jnp.ones((2, 1), jnp.int32), jnp.full((2,), 5, jnp.int32), cache).compile().as_text()
    whole = [f"f32[{','.join(map(str, a.shape))}]" for a in jax.tree.leaves((model.params, cache)) if a.ndim >= 2]
    converted = [line.strip()[:120] for line in hlo.splitlines()
                 if re.search(r"= f32\[[0-9,]+\]\S* convert\(", line) and any(w + "{" in line for w in whole)]
    assert converted == []


def test_importing_the_decoder_asks_xla_to_keep_every_rounding():
    import os

    assert "--xla_allow_excess_precision=false" in os.environ["XLA_FLAGS"]


@pytest.mark.slow
def test_a_blocks_first_row_equals_an_ar_step_in_bf16(tiny_llama_dir):
    """The anchor row of a verify pass and the same token decoded alone (batch 1 and batch 2)
    give the same bf16 hidden states and logits, bit for bit, in every layer."""
    model = load_target(str(tiny_llama_dir), dtype="bfloat16", with_tokenizer=False)
    cfg = model.config
    fn = jax.jit(lambda p, t, s, c: forward(p, cfg, t, s, c, collect_layers=tuple(range(cfg.num_layers))))
    rng = np.random.default_rng(0)
    for batch in (1, 2):
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, 48, cfg.head_dim)
        cache = KVCache(k=jnp.zeros(shape, jnp.bfloat16), v=jnp.zeros(shape, jnp.bfloat16))
        prompt = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, 20)), jnp.int32)
        _, _, cache = fn(model.params, prompt, jnp.zeros((batch,), jnp.int32), cache)
        block = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, 8)), jnp.int32)
        start = jnp.full((batch,), 20, jnp.int32)
        logits_block, hidden_block, _ = fn(model.params, block, start, cache)
        logits_step, hidden_step, _ = fn(model.params, block[:, :1], start, cache)
        np.testing.assert_array_equal(np.asarray(hidden_step[:, 0], np.float32), np.asarray(hidden_block[:, 0], np.float32))
        np.testing.assert_array_equal(np.asarray(logits_step[:, 0]), np.asarray(logits_block[:, 0]))


@pytest.fixture(scope="module")
def smollm2_wide_dir(tmp_path_factory):
    """A random 2-layer Llama with SmolLM2-135M's widths."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("wide"), "llama", hidden_size=576, intermediate_size=1536,
                                num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=2)


def test_every_row_of_a_verify_block_equals_the_ar_step_at_its_position_in_bf16(smollm2_wide_dir):
    """Row t of an 8-token verify pass and the t-th of eight 1-token steps give the same hidden
    states and logits, bit for bit, in every layer (batch 3, ragged starts). This holds only if
    no sum depends on the block length: the attention must not add "cache part + block part"
    (a step sees earlier block rows as cache rows), and RMSNorm's mean must not take an order
    that XLA picks from the number of rows (the two tests below prove each part alone, in
    float32, where every regrouping shows). The model has SmolLM2's widths.

    float32 is not bit-exact in this sense on this CPU: XLA's float32 matmuls sum in an order
    that depends on the row count (bf16's do not), so float32 promises identical tokens only."""
    model = load_target(str(smollm2_wide_dir), dtype="bfloat16", with_tokenizer=False)
    cfg = model.config
    fn = jax.jit(lambda p, t, s, c: forward(p, cfg, t, s, c, collect_layers=tuple(range(cfg.num_layers))))
    rng = np.random.default_rng(1)
    batch, t = 3, 8
    cache = KVCache.init(cfg, batch, 64)
    prompt = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, 30)), jnp.int32)
    _, _, cache = fn(model.params, prompt, jnp.zeros((batch,), jnp.int32), cache)
    start = jnp.asarray([30, 17, 25], jnp.int32)  # ragged: rows past a start are stale prompt rows
    block = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, t)), jnp.int32)
    logits_block, hidden_block, _ = fn(model.params, block, start, cache)
    for i in range(t):
        logits_step, hidden_step, cache = fn(model.params, block[:, i:i + 1], start + i, cache)
        np.testing.assert_array_equal(np.asarray(hidden_step[:, 0], np.float32),
                                      np.asarray(hidden_block[:, i], np.float32), err_msg=f"row {i}")
        np.testing.assert_array_equal(np.asarray(logits_step[:, 0]), np.asarray(logits_block[:, i]), err_msg=f"row {i}")


def test_rms_norm_gives_a_row_the_same_bits_whatever_the_number_of_rows():
    """RMSNorm of the first rows of a [4, 8, 576] array equals RMSNorm of those rows alone
    ([4, 1, 576]), bit for bit in float32 (XLA's own mean picks its order from the shape)."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 8, 576)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(4).uniform(0.8, 1.2, 576), jnp.float32)
    norm = jax.jit(lambda x: rms_norm(x, w, 1e-5))
    np.testing.assert_array_equal(np.asarray(norm(x)[:, :1]), np.asarray(norm(x[:, :1])))


def test_verify_attention_row_t_equals_a_one_token_call_that_sees_the_block_as_cache():
    """Query t of an 8-row verify call and a 1-row call whose cache already holds block rows
    < t: the same float32 bits (SmolLM2's heads, ragged lengths)."""
    rng = np.random.default_rng(5)
    b, t, k, g, h, s = 3, 8, 3, 3, 64, 200
    rnd = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)  # noqa: E731
    q, kc, vc, kn, vn = rnd(b, t, k, g, h), rnd(b, k, s, h), rnd(b, k, s, h), rnd(b, t, k, h), rnd(b, t, k, h)
    lengths = jnp.asarray([150, 37, 101], jnp.int32)
    attend = jax.jit(functools.partial(reference_verify_attention, out_dtype=jnp.float32))
    full = np.asarray(attend(q, kc, vc, lengths, kn, vn))
    rows = jnp.arange(b)
    for i in range(t):
        one = attend(q[:, i:i + 1], kc, vc, lengths + i, kn[:, i:i + 1], vn[:, i:i + 1])
        np.testing.assert_array_equal(np.asarray(one)[:, 0], full[:, i], err_msg=f"row {i}")
        kc = kc.at[rows, :, lengths + i].set(kn[:, i])
        vc = vc.at[rows, :, lengths + i].set(vn[:, i])
