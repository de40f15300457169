"""The feature cache: what the target computes, stored once, reused when the data set grows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dflash_batch.decoder import KVCache, forward
from dflash_batch.decoder._target import final_norm
from dflash_batch.decoder.train import Sample, build_feature_cache

LAYERS = (0, 2)


def _samples(vocab, n, seed=0):
    rng = np.random.default_rng(seed)
    return [Sample(f"s{i}", rng.integers(3, vocab, int(rng.integers(3, 9))).astype(np.int32),
                   rng.integers(3, vocab, int(rng.integers(2, 7))).astype(np.int32), "length") for i in range(n)]


@pytest.mark.slow
def test_cache_holds_the_targets_features_and_next_token_distributions(tiny_llama, tmp_path):
    samples = _samples(tiny_llama.config.vocab_size, 3)
    cache = build_feature_cache(tiny_llama, samples, tmp_path, LAYERS, top_k=4)
    for i, s in enumerate(samples):
        toks = s.token_ids[None]
        last = tiny_llama.config.num_layers - 1
        logits, feats, _ = forward(tiny_llama.params, tiny_llama.config, jnp.asarray(toks), jnp.zeros((1,), jnp.int32),
                                   KVCache.init(tiny_llama.config, 1, toks.shape[1]), collect_layers=LAYERS + (last,))
        head_in = np.asarray(final_norm(tiny_llama.params, tiny_llama.config, feats[0, :, -1]))
        feats = feats[:, :, :-1]
        rows = cache.rows(i)
        np.testing.assert_allclose(cache.feats[rows], np.asarray(feats[0]), rtol=2e-3, atol=2e-3)  # fp16
        probs = np.asarray(jax.nn.softmax(logits[0], -1))
        p, n = len(s.prompt_ids), len(toks[0])
        for t in range(p - 1, n - 1):  # the response tokens' rows: distribution of token t+1
            want = np.argsort(-probs[t])[:4]
            assert cache.topk_ids[rows][t].tolist() == want.tolist()
            np.testing.assert_allclose(cache.topk_probs[rows][t], probs[t, want], rtol=2e-3, atol=1e-4)
            np.testing.assert_allclose(cache.head_in[rows][t], head_in[t], rtol=2e-3, atol=2e-3)  # fp16
    assert cache.response_tokens == sum(len(s.response_ids) for s in samples)


def test_grown_data_set_reuses_the_rows_of_its_unchanged_prefix(tiny_llama, tmp_path):
    samples = _samples(tiny_llama.config.vocab_size, 6, seed=1)
    first = build_feature_cache(tiny_llama, samples[:4], tmp_path, LAYERS, top_k=4)
    before = np.array(first.feats), np.array(first.topk_ids), np.array(first.head_in)
    computed = []
    grown = build_feature_cache(tiny_llama, samples, tmp_path, LAYERS, top_k=4, progress=lambda d, n: computed.append(d))
    assert computed == [5, 6]  # only the two new sequences ran through the target
    rows = slice(0, int(first.offsets[4]))
    np.testing.assert_array_equal(grown.feats[rows], before[0])
    np.testing.assert_array_equal(grown.topk_ids[rows], before[1])
    np.testing.assert_array_equal(grown.head_in[rows], before[2])
    assert grown.ids == [s.id for s in samples] and len(grown.tokens) == int(grown.offsets[-1])
