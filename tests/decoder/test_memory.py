"""The memory plan: per-chip bytes against hand-computed figures, and the layout choice."""

from __future__ import annotations

import pytest

from dflash_batch.decoder import HBM_PER_CHIP, DrafterConfig, LayoutError, TargetConfig, cache_length, choose_layout, \
    plan

QWEN3_8B = TargetConfig(family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
                        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                        tie_word_embeddings=False, max_position_embeddings=40960)
# The tiny Llama of tests/tiny_models.py: V 128, D 64, F 96, 3 layers, 4 q / 2 kv heads, H 16, untied.
TINY = TargetConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                    num_kv_heads=2, head_dim=16, rope_theta=1e4, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    max_position_embeddings=512)
TINY_DRAFTER = DrafterConfig(block_size=8, mask_token_id=3, target_layer_ids=(0, 2), num_layers=2, hidden_size=64,
                             intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4,
                             rms_norm_eps=1e-6, vocab_size=128)


def test_qwen3_8b_weights_and_kv_cache_match_hand_computed_bytes():
    p = plan(QWEN3_8B, batch_size=64, cache_len=4096, data=1, model=1, capacity=HBM_PER_CHIP["v5p"], block=1,
             dtype_bytes=2, cache_bytes=2, sampling=False)
    # per layer: qkv 4096*(32+2*8)*128 + o 32*128*4096 + MLP 3*4096*12288 + 2 norms of 4096 + q/k norms of 128
    per_layer = 4096 * 48 * 128 + 4096 * 4096 + 3 * 4096 * 12288 + 2 * 4096 + 2 * 128
    assert per_layer == 192_946_432
    params = 36 * per_layer + 2 * 151936 * 4096 + 4096  # + embedding, lm_head, final norm
    assert params == 8_190_735_360  # Qwen3-8B's published 8.2B
    assert p.weights == 2 * params
    # K and V: 2 * 36 layers * 64 rows * 8 kv heads * 4096 positions * 128 * 2 bytes = 38.65 GB
    assert p.kv_cache == 38_654_705_664
    assert (p.drafter, p.drafter_cache) == (0, 0)


def test_qwen3_8b_tensor_parallel_4_holds_a_quarter_of_each_sharded_weight():
    p = plan(QWEN3_8B, batch_size=64, cache_len=4096, data=1, model=4, capacity=HBM_PER_CHIP["v5e"], block=1,
             dtype_bytes=2, cache_bytes=2, sampling=False)
    sharded = 4096 * 48 * 128 + 4096 * 4096 + 3 * 4096 * 12288
    whole = 2 * 4096 + 2 * 128
    assert p.weights == 2 * (36 * (sharded // 4 + whole) + 2 * 151936 // 4 * 4096 + 4096)
    assert p.kv_cache == 38_654_705_664 // 4


def test_tiny_config_every_figure_by_hand():
    # data 2 x model 2, batch 4 (2 rows per replica), cache 64, block 8, fp32 everywhere
    p = plan(TINY, TINY_DRAFTER, batch_size=4, cache_len=64, data=2, model=2, capacity=10**9, block=8)
    layer_sharded = 64 * (4 + 4) * 16 + 64 * 64 + 3 * 64 * 96  # qkv, o, gate/up/down
    assert p.weights == 4 * (3 * (layer_sharded // 2 + 2 * 64) + 2 * 128 // 2 * 64 + 64)
    # drafter: 2 layers like the target's (+ q/k norms of 16), fc 2*64 x 64, hidden_norm, norm
    assert p.drafter == 4 * (2 * (layer_sharded // 2 + 2 * 64 + 2 * 16) + 2 * 64 * 64 + 2 * 64)
    assert p.kv_cache == 4 * 2 * 3 * 2 * 1 * 64 * 16  # K+V, 3 layers, 2 rows, 1 kv head per chip
    assert p.drafter_cache == 4 * (2 * 64) + 4 * 2 * 2 * 2 * 1 * 64 * 16  # token history + context K/V
    rows, blk = 2, 8
    act = (rows * blk * 64 * 4 + 2 * rows * blk * 128 * 4  # logits over V/T, two gathered copies for sampling
           + rows * blk * 2 * 64 * 4 + rows * blk * 2 * 48 * 4  # attention scores (N/T heads x S), MLP 2F/T
           + 2 * 3 * rows * blk * 1 * 16 * 4  # new K/V of every layer
           + 3 * rows * blk * 64 * 4 + rows * blk * 64 * 4)  # target features, draft logits
    assert p.activations == act
    assert p.total == p.weights + p.drafter + p.kv_cache + p.drafter_cache + p.activations


def test_cache_length_is_the_decoders():
    assert cache_length(2048, 256) == 2304
    assert cache_length(100, 10) == 138  # 100 rounded up to whole 64-token prefill chunks


def test_auto_takes_the_smallest_tensor_parallel_that_fits_and_gives_the_rest_to_data():
    kw = dict(batch_size=64, cache_len=4096, dtype_bytes=2, cache_bytes=2)
    assert (lambda p: (p.data, p.model))(choose_layout(QWEN3_8B, chips=4, capacity=HBM_PER_CHIP["v5p"], **kw)) == (4, 1)
    p = choose_layout(QWEN3_8B, chips=8, capacity=HBM_PER_CHIP["v5e"], **kw)
    assert p.model > 1 and p.data * p.model == 8 and p.fits
    smaller = plan(QWEN3_8B, data=8 // (p.model // 2), model=p.model // 2, capacity=HBM_PER_CHIP["v5e"], **kw)
    assert not smaller.fits


@pytest.mark.parametrize("kw, setting, words", [
    (dict(chips=4, tensor_parallel=3), "tensor_parallel", "degrees that can: [1, 2]"),
    (dict(chips=4, data_parallel=4, tensor_parallel=2), "tensor_parallel", "8 chips, but 4 chips has 4"),
    (dict(chips=2, data_parallel=4), "data_parallel", "needs 4 chips"),
    (dict(chips=4, batch_size=6), "batch_size", "use a multiple of 4"),
    (dict(chips=1, capacity=10**6), "topology", "does not fit"),
    (dict(chips=4, data_parallel=2, tensor_parallel=1, capacity=6 * 10**5), "tensor_parallel", "a larger tensor_parallel"),
])
def test_impossible_layouts_are_refused_naming_the_setting(kw, setting, words):
    args = {"batch_size": 8, "cache_len": 64, "capacity": 10**9, **kw}
    with pytest.raises(LayoutError) as e:
        choose_layout(TINY, **args)
    assert e.value.setting == setting
    assert words in str(e.value)
