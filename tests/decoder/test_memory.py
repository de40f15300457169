"""The memory plan: per-chip bytes against hand-computed figures and against what a decoder
really holds, the layout choice, and refusals that say what would fit."""

from __future__ import annotations

import gc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dflash_batch.decoder import (HBM_PER_CHIP, DecodeConfig, Decoder, DrafterConfig, LayoutError, Request,
                                  TargetConfig, cache_length, choose_layout, load_target, plan)
from dflash_batch.decoder._memory_table import QWEN3_8B, drafter_for, memory_table

# The tiny Llama of tests/tiny_models.py: V 128, D 64, F 96, 3 layers, 4 q / 2 kv heads, H 16, untied.
TINY = TargetConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                    num_kv_heads=2, head_dim=16, rope_theta=1e4, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    max_position_embeddings=512)
TINY_DRAFTER = DrafterConfig(block_size=8, mask_token_id=3, target_layer_ids=(0, 2), num_layers=2, hidden_size=64,
                             intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4,
                             rms_norm_eps=1e-6, vocab_size=128)
# Batch 64, AR, one bucket whose cache is 3840 + 256 = 4096 rows per slot.
AR_4096 = DecodeConfig(mode="ar", batch_size=64, prompt_buckets=(3840,), max_new_tokens=256)
QWEN3_8B_PARAMS = 8_190_735_360  # 36 layers of 192,946,432 + embedding, lm_head and final norm
QWEN3_8B_KV_ELEMENTS = 2 * 36 * 64 * 8 * 4096 * 128  # K and V, layers, rows, kv heads, positions, head dim


def test_qwen3_8b_weights_kv_cache_and_slots_match_hand_computed_bytes():
    p = plan(QWEN3_8B, decode=AR_4096, dtype="float32", capacity=HBM_PER_CHIP["v5p"], sampling=False)
    # per layer: qkv 4096*(32+2*8)*128 + o 32*128*4096 + MLP 3*4096*12288 + 2 norms of 4096 + q/k norms of 128
    per_layer = 4096 * 48 * 128 + 4096 * 4096 + 3 * 4096 * 12288 + 2 * 4096 + 2 * 128
    assert per_layer == 192_946_432
    assert 36 * per_layer + 2 * 151936 * 4096 + 4096 == QWEN3_8B_PARAMS  # Qwen3-8B's published 8.2B
    assert p.weights == 4 * QWEN3_8B_PARAMS
    assert p.kv_cache == 4 * QWEN3_8B_KV_ELEMENTS == 77_309_411_328
    assert (p.drafter, p.drafter_cache, p.cache_rows) == (0, 0, 4096)
    # out [64, 256] int32; pos, last, n_out, budget, drafted, accepted int32; done, eos bool;
    # temperature, top_p float32; key [64, 2] uint32; hist [64, 1] int32
    assert p.slots == 64 * 256 * 4 + 6 * 64 * 4 + 2 * 64 + 2 * 64 * 4 + 64 * 2 * 4 + 64 * 4


def test_bfloat16_halves_the_weights_and_the_caches_take_the_dtype_their_constructor_allocates():
    p = plan(QWEN3_8B, decode=AR_4096, dtype="bfloat16", capacity=HBM_PER_CHIP["v5p"], sampling=False)
    assert p.weights == 2 * QWEN3_8B_PARAMS
    assert p.kv_cache == QWEN3_8B_KV_ELEMENTS * jnp.dtype(p.cache_dtype).itemsize


def test_qwen3_8b_tensor_parallel_4_holds_a_quarter_of_each_sharded_weight_and_of_the_cache():
    p = plan(QWEN3_8B, decode=AR_4096, dtype="bfloat16", model=4, capacity=HBM_PER_CHIP["v5e"], sampling=False)
    sharded = 4096 * 48 * 128 + 4096 * 4096 + 3 * 4096 * 12288
    whole = 2 * 4096 + 2 * 128
    assert p.weights == 2 * (36 * (sharded // 4 + whole) + 2 * 151936 // 4 * 4096 + 4096)
    assert p.kv_cache == QWEN3_8B_KV_ELEMENTS // 4 * jnp.dtype(p.cache_dtype).itemsize


def test_tiny_config_every_figure_by_hand():
    # data 2 x model 2, batch 4 (2 rows per replica), a 40-token bucket in 16-token chunks + 16 new
    # tokens = 64 cache rows, dflash at block 8, float32
    decode = DecodeConfig(mode="dflash", block_size=8, batch_size=4, prompt_buckets=(16, 40), prefill_chunk=16,
                          max_new_tokens=16)
    p = plan(TINY, TINY_DRAFTER, decode=decode, dtype="float32", data=2, model=2, capacity=10**9)
    assert p.cache_rows == 64
    layer_sharded = 64 * (4 + 4) * 16 + 64 * 64 + 3 * 64 * 96  # qkv, o, gate/up/down
    assert p.weights == 4 * (3 * (layer_sharded // 2 + 2 * 64) + 2 * 128 // 2 * 64 + 64)
    # drafter: 2 layers like the target's (+ q/k norms of 16), fc 2*64 x 64, hidden_norm, norm
    assert p.drafter == 4 * (2 * (layer_sharded // 2 + 2 * 64 + 2 * 16) + 2 * 64 * 64 + 2 * 64)
    assert p.kv_cache == 4 * 2 * 3 * 2 * 1 * 64 * 16  # K+V, 3 layers, 2 rows, 1 kv head per chip
    assert p.drafter_cache == 4 * (2 * 64) + 4 * 2 * 2 * 2 * 1 * 64 * 16  # token history + context K/V
    # per row (2 per chip): out [16] + 6 int32 + 2 bool + 2 float32 + key [2] + hist [8] + ctx_len;
    # the proposal statistics, replicated: hits and tries [4, 7] float32, 2 float32 + 3 int32 scalars
    assert p.slots == 2 * (16 * 4 + 6 * 4 + 2 + 2 * 4 + 2 * 4 + 8 * 4 + 4) + 2 * 4 * 7 * 4 + 5 * 4
    rows, blk = 2, 8
    act = (rows * blk * 64 * 4 + 2 * rows * blk * 128 * 4  # logits over V/T, two gathered copies for sampling
           + rows * blk * 2 * 64 * 4 + rows * blk * 2 * 48 * 4  # attention scores (N/T heads x S), MLP 2F/T
           + 2 * 3 * rows * blk * 1 * 16 * 4  # new K/V of every layer
           + 3 * rows * blk * 64 * 4 + rows * blk * 64 * 4)  # target features, draft logits
    assert p.activations == act
    assert p.total == p.held + p.activations
    assert p.held == p.weights + p.drafter + p.kv_cache + p.drafter_cache + p.slots


def test_cache_length_is_the_decoders():
    assert cache_length(2048, DecodeConfig(max_new_tokens=256)) == 2304
    assert cache_length(100, DecodeConfig(max_new_tokens=10)) == 138  # 100 rounded up to whole 64-token chunks
    assert cache_length(100, DecodeConfig(max_new_tokens=10, prefill_chunk=16)) == 122


# ---- the plan against what a decoder really holds ------------------------------------------------

def _live_bytes() -> int:
    """Bytes of the (single-device) buffers alive, each counted once. ``sum(a.nbytes for a in
    jax.live_arrays())`` counts some twice: after dflash calls, the target's weights and the
    state's small arrays each appear as two array objects over one buffer (same address)."""
    return sum({a.unsafe_buffer_pointer(): a.nbytes for a in jax.live_arrays() if not a.is_deleted()}.values())


def _requests(bucket: int, n: int, seed: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    return [Request(id=f"{bucket}-{i}", token_ids=list(rng.integers(3, 128, size=int(rng.integers(bucket // 2, bucket)))),
                    max_new_tokens=int(rng.integers(4, 24))) for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype, mode", [("float32", "dflash"), ("bfloat16", "ar"), ("bfloat16", "ngram")])
def test_a_decoder_warm_in_two_buckets_holds_what_the_plan_counts(tiny_llama_dir, dtype, mode):
    """Two buckets warmed and decoded, then the first again: the arrays alive (measured after
    every prefill, decode and state allocation, warmup included) never exceed the plan, never
    hold a second state, and between batches are exactly the weights and one state."""
    from tiny_models import random_drafter

    gc.collect()
    before = _live_bytes()
    target = load_target(str(tiny_llama_dir), dtype=dtype, with_tokenizer=False)
    drafter = random_drafter(target.config, block_size=8) if mode in ("dflash", "hybrid") else None
    config = DecodeConfig(mode=mode, block_size=1 if mode == "ar" else 4, batch_size=3, max_new_tokens=24, prompt_buckets=(16, 64),
                          prefill_chunk=16)
    dec = Decoder(target, config, drafter)
    p = plan(target.config, drafter.config if drafter else None, decode=config, dtype=dtype, capacity=10**9)
    seen = []

    def measured(fn):
        def call(*args, **kw):
            out = fn(*args, **kw)
            seen.append(_live_bytes() - before)
            return out
        return call

    for bucket in (16, 64):
        phases = dec.engine(bucket).phases
        phases.prefill, phases.decode, phases.init_state = map(measured, (phases.prefill, phases.decode,
                                                                          phases.init_state))
    held = {}
    for bucket in (16, 64, 16):
        dec.warmup(bucket)
        assert len(list(dec.generate(_requests(bucket, 4, seed=bucket), bucket=bucket))) == 4
        held[bucket] = _live_bytes() - before
    state = dec.engine(16).state
    assert str(state.cache.k.dtype) == p.cache_dtype
    assert max(seen) <= p.total
    assert max(seen) - p.held < 1024  # a call's small arguments (keys, flags), never a second state
    assert held[64] == p.held  # weights and the largest bucket's state, nothing else
    assert held[16] < held[64]  # the smaller bucket's state replaced the larger one
    assert dec.engine(64).state is None


def test_warmup_drops_its_own_state_before_making_the_batchs(tiny_llama, tiny_drafter):
    dec = Decoder(tiny_llama, DecodeConfig(mode="dflash", block_size=8, batch_size=2, max_new_tokens=8,
                                           prompt_buckets=(32,), prefill_chunk=16), tiny_drafter)
    engine, states = dec.engine(32), []
    init = engine.phases.init_state

    def counted():
        states.append(_live_bytes())
        return init()

    engine.phases.init_state = counted
    dec.warmup(32)
    assert len(states) == 2 and states[1] <= states[0]  # the second allocation found the first gone


def test_another_buckets_batch_cannot_silently_continue_after_the_state_moved(tiny_llama):
    dec = Decoder(tiny_llama, DecodeConfig(batch_size=2, max_new_tokens=24, prompt_buckets=(16, 32), prefill_chunk=16))
    first = dec.start(_requests(16, 3, seed=1), bucket=16)
    first.refill()
    list(dec.generate(_requests(32, 2, seed=2), bucket=32))
    with pytest.raises(RuntimeError, match="bucket 16 lost its slot state"):
        first.decode()


# ---- layouts and refusals ---------------------------------------------------------------------

def test_auto_takes_the_smallest_tensor_parallel_that_fits_and_gives_the_rest_to_data():
    kw = dict(decode=AR_4096, dtype="float32")
    p = choose_layout(QWEN3_8B, chips=4, capacity=HBM_PER_CHIP["v5p"], **kw)
    assert (p.data, p.model) == (4, 1)
    p = choose_layout(QWEN3_8B, chips=8, capacity=HBM_PER_CHIP["v5e"], **kw)
    assert (p.data, p.model) == (1, 8) and p.fits
    assert not plan(QWEN3_8B, data=2, model=4, capacity=HBM_PER_CHIP["v5e"], **kw).fits


def test_qwen3_8b_with_its_drafter_fits_v5e_8_in_bfloat16_and_float32_is_refused_naming_the_dtype():
    decode = DecodeConfig(mode="dflash", batch_size=64, max_new_tokens=1024)  # buckets up to 2048
    v5e = dict(chips=8, capacity=HBM_PER_CHIP["v5e"], decode=decode, where="v5e 2x4")
    p = choose_layout(QWEN3_8B, drafter_for(QWEN3_8B), dtype="bfloat16", **v5e)
    assert p.fits and p.data * p.model == 8
    with pytest.raises(LayoutError) as e:
        choose_layout(QWEN3_8B, drafter_for(QWEN3_8B), dtype="float32", **v5e)
    assert e.value.setting == "dtype"
    assert f"dtype bfloat16 (data {p.data} x model {p.model}" in str(e.value)
    assert "does not fit v5e 2x4 at batch_size 64 in float32" in str(e.value)
    assert [name for name, _ in e.value.options] == ["dtype", "batch_size", "max_new_tokens", "prompt_buckets",
                                                     "topology"]


@pytest.mark.parametrize("kw, setting, words", [
    (dict(chips=4, tensor_parallel=3), "tensor_parallel", "degrees that can: [1, 2]"),
    (dict(chips=4, data_parallel=4, tensor_parallel=2), "tensor_parallel", "8 chips, but 4 chips has 4"),
    (dict(chips=2, data_parallel=4), "data_parallel", "needs 4 chips"),
    (dict(chips=4, batch_size=6), "batch_size", "use a multiple of 4"),
    (dict(chips=1, capacity=10**5), "topology", "What fits: a larger topology"),
    (dict(chips=1, capacity=9 * 10**5, dtype="float32"), "dtype", "What fits: dtype bfloat16"),
    (dict(chips=1, capacity=4 * 10**5), "batch_size", "What fits: batch_size 4;"),  # bf16 caches: half of float32's
    (dict(chips=4, data_parallel=2, tensor_parallel=1, capacity=3 * 10**5), "tensor_parallel",
     "What fits: tensor_parallel 2"),
])
def test_impossible_layouts_are_refused_naming_the_setting(kw, setting, words):
    decode = {k: kw.pop(k) for k in ("batch_size", "data_parallel", "tensor_parallel") if k in kw}
    args = {"capacity": 10**9, "dtype": "bfloat16", **kw,
            "decode": DecodeConfig(**{"batch_size": 8, "max_new_tokens": 16, "prompt_buckets": (48,), **decode})}
    with pytest.raises(LayoutError) as e:
        choose_layout(TINY, **args)
    assert e.value.setting == setting
    assert words in str(e.value)


# ---- the documented table ---------------------------------------------------------------------

def test_the_memory_table_in_the_design_doc_is_the_plans():
    design = (Path(__file__).parents[2] / "docs" / "design.md").read_text(encoding="utf-8")
    assert memory_table() in design
