"""The decoder in bfloat16: what is stored in bf16, what stays float32, and that speculative
decoding stays lossless and batch-invariant in bf16."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dflash_batch.decoder import Drafter, Request, load_target
from dflash_batch.decoder._layers import dense, rms_norm
from dflash_batch.decoder._slots import Slots
from dflash_batch.decoder._speculative import init_spec_state
from decoding import make_decoder
from oracle_proposer import propose_oracle
from tiny_models import random_drafter

BUCKETS = (64,)
NEW = 24


def as_bf16_drafter(drafter: Drafter) -> Drafter:
    cast = lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    return Drafter(dataclasses.replace(drafter.config, dtype="bfloat16"), jax.tree.map(cast, drafter.params))


@pytest.fixture(scope="module")
def bf16_target(tiny_llama_dir):
    return load_target(str(tiny_llama_dir), dtype="bfloat16", with_tokenizer=False)


@pytest.fixture(scope="module")
def bf16_drafter(bf16_target):
    return as_bf16_drafter(random_drafter(bf16_target.config, block_size=8))


def _requests(n, vocab, seed=11):
    """Random prompts, every third one repetitive so n-gram drafts get accepted."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = [int(t) for t in rng.integers(3, vocab, size=int(rng.integers(3, 50)))]
        if i % 3 == 0:
            prompt = (prompt[:5] * 8)[:40]
        out.append(Request(id=str(i), token_ids=prompt, max_new_tokens=NEW - i % 5))
    return out


def _tokens(dec, reqs):
    return {r.id: r.token_ids for r in dec.generate(reqs)}


@pytest.fixture(scope="module")
def reqs(bf16_target):
    return _requests(16, bf16_target.config.vocab_size)


@pytest.fixture(scope="module")
def bf16_ar(bf16_target, reqs):
    return _tokens(make_decoder(bf16_target, batch_size=4, max_new_tokens=NEW, prompt_buckets=BUCKETS,
                                prefill_chunk=16), reqs)


@pytest.mark.parametrize("dtype", ["bfloat16", jnp.bfloat16, "float32", jnp.float32])
def test_load_target_takes_any_jnp_dtype(tiny_llama_dir, dtype):
    target = load_target(str(tiny_llama_dir), dtype=dtype, with_tokenizer=False)
    assert target.config.dtype == jnp.dtype(dtype).name
    assert {a.dtype for a in jax.tree.leaves(target.params)} == {jnp.dtype(dtype)}


@pytest.mark.parametrize("dtype", ["int8", "not-a-dtype"])
def test_load_target_refuses_a_non_float_dtype_naming_it(tiny_llama_dir, dtype):
    with pytest.raises(ValueError, match=f"dtype='{dtype}'"):
        load_target(str(tiny_llama_dir), dtype=dtype, with_tokenizer=False)


def test_loading_casts_each_tensor_once_to_nearest(tiny_llama_dir, tiny_llama, bf16_target):
    """bf16 weights are the float32 checkpoint rounded once (to nearest even), not a
    truncation or a double rounding."""
    want = jax.tree.map(lambda a: np.asarray(a.astype(jnp.bfloat16)), tiny_llama.params)
    jax.tree.map(lambda w, g: np.testing.assert_array_equal(np.asarray(g), w), want, bf16_target.params)


def test_the_caches_take_the_loaded_dtype(bf16_target, bf16_drafter):
    slots = Slots.init(bf16_target.config, 2, 32, 8, 8, extra=init_spec_state(2, 32, bf16_drafter.config, 8))
    assert slots.cache.k.dtype == slots.cache.v.dtype == jnp.bfloat16
    assert slots.extra.ctx_k.dtype == slots.extra.ctx_v.dtype == jnp.bfloat16


def test_rms_norm_statistics_are_float32():
    """Squares of bf16 activations of a few hundred overflow nothing but lose every low bit
    if summed in bf16; the float32 statistic gives the float32 answer rounded once."""
    x = jnp.asarray(np.random.default_rng(0).normal(0, 300, (4, 576)), jnp.bfloat16)
    w = jnp.ones((576,), jnp.bfloat16)
    want = rms_norm(x.astype(jnp.float32), w.astype(jnp.float32), 1e-5).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(rms_norm(x, w, 1e-5)), np.asarray(want))


def test_dense_asks_for_float32_accumulation():
    """XLA on CPU accumulates bf16 dots in float32 anyway; a TPU does what it is asked, so the
    request itself is checked: a float32 dot, rounded once to bf16."""
    x, w = jnp.ones((2, 8), jnp.bfloat16), jnp.ones((8, 3), jnp.bfloat16)
    eqns = jax.make_jaxpr(dense)(x, w).jaxpr.eqns
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert [d.params["preferred_element_type"] for d in dots] == [jnp.float32]
    assert dense(x, w).dtype == jnp.bfloat16


def test_logits_are_float32(bf16_target, bf16_ar, reqs):
    from dflash_batch.decoder._cache import KVCache
    from dflash_batch.decoder._target import forward

    cfg = bf16_target.config
    logits, _, cache = forward(bf16_target.params, cfg, jnp.asarray([[5, 6, 7]]), jnp.zeros((1,), jnp.int32),
                               KVCache.init(cfg, 1, 8))
    assert logits.dtype == jnp.float32 and cache.k.dtype == jnp.bfloat16


# Every mode at batch 4; the oracle, whose drafts are all accepted, also at batch 1 and 16. What
# the batch size changes is the verify pass (batch 1 takes other matmul routines), the same for
# every proposer: a proposer only chooses the drafts that pass verifies.
@pytest.mark.parametrize("mode,batch_size", [("dflash", 4), ("ngram", 4), ("hybrid", 4), ("oracle", 1),
                                             ("oracle", 4), ("oracle", 16)])
@pytest.mark.slow
def test_bf16_speculative_greedy_is_token_identical_to_bf16_ar(bf16_target, bf16_drafter, reqs, bf16_ar, mode,
                                                               batch_size):
    """Every committed token comes from an 8-token verify pass, and its K/V rows too; the
    random drafter's blocks are mostly rejected, so a perfect (oracle) drafter makes sure
    accepted drafts are exercised."""
    settings = dict(mode="ngram", proposer=propose_oracle) if mode == "oracle" else dict(mode=mode)
    dec = make_decoder(bf16_target, **settings, drafter=bf16_drafter if mode in ("dflash", "hybrid") else None,
                       block_size=8, batch_size=batch_size, max_new_tokens=NEW, prompt_buckets=BUCKETS,
                       prefill_chunk=16)
    out = list(dec.generate(reqs))
    assert {r.id: r.token_ids for r in out} == bf16_ar
    if mode == "oracle":
        assert sum(r.draft_tokens_accepted for r in out) > 0


@pytest.mark.parametrize("batch_size", [1, 16])
def test_bf16_output_of_a_row_does_not_depend_on_batch_size_or_slot(bf16_target, reqs, bf16_ar, batch_size):
    """The reference ran at batch 4; here other batch sizes, and the requests in reverse order
    (so every row sits in another slot beside other rows)."""
    dec = make_decoder(bf16_target, batch_size=batch_size, max_new_tokens=NEW, prompt_buckets=BUCKETS,
                       prefill_chunk=16)
    assert _tokens(dec, reqs[::-1]) == bf16_ar


def test_bf16_changes_few_tokens_against_float32(tiny_llama, reqs, bf16_ar):
    """Not a lossless claim, a sanity check: bf16 is the same model, so most rows agree at first."""
    f32 = _tokens(make_decoder(tiny_llama, batch_size=4, max_new_tokens=NEW, prompt_buckets=BUCKETS,
                               prefill_chunk=16), reqs)
    first_equal = sum(f32[k][:4] == bf16_ar[k][:4] for k in f32)
    assert first_equal >= len(f32) // 2
