"""Online training computes in the step exactly what the offline path reads from its feature cache."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from tiny_training import SPEC, TRAIN

from dflash_batch.decoder.train import (
    Sample, Trainer, TokenSequences, build_feature_cache, drafter_config, feature_inv_scale, feature_scale,
    init_params, target_to_draft,
)


@pytest.fixture(scope="module")
def both(tiny32, tmp_path_factory):
    """An offline and an online trainer over the same eight sequences, and fresh drafter parameters."""
    rng = np.random.default_rng(0)
    vocab = tiny32.config.vocab_size
    samples = [Sample(f"s{i}", rng.integers(3, vocab, int(rng.integers(4, 12))).astype(np.int32),
                      rng.integers(3, vocab, int(rng.integers(10, 30))).astype(np.int32), "length") for i in range(8)]
    dcfg = drafter_config(SPEC, tiny32)
    cache = build_feature_cache(tiny32, samples, tmp_path_factory.mktemp("feats"), dcfg.target_layer_ids,
                                top_k=TRAIN.top_k)
    tokens = TokenSequences.from_samples(samples)
    inv = feature_inv_scale(cache.scale, True)
    d2t = np.arange(3, 3 + SPEC.draft_vocab_size, dtype=np.int32)
    t2d = target_to_draft(d2t, dcfg.vocab_size)
    tcfg = dataclasses.replace(TRAIN, batch_size=4, top_k=min(TRAIN.top_k, vocab))
    offline = Trainer(dcfg, tiny32.params, cache, tcfg, inv_scale=inv, t2d=t2d)
    online = Trainer(dcfg, tiny32.params, tokens, tcfg, inv_scale=inv, t2d=t2d, target_config=tiny32.config)
    params = init_params(dcfg, tiny32.params, tiny32.config, jax.random.PRNGKey(0), inv_scale=inv, d2t=d2t)
    return offline, online, params, cache, tokens


def test_online_batch_draws_the_same_blocks_as_the_offline_batch(both):
    offline, online, _, _, _ = both
    seqs = np.array([0, 3, 5, 7])
    a = offline.batch(seqs, np.random.default_rng(4))
    b = online.batch(seqs, np.random.default_rng(4))
    for k in ("anchor_pos", "anchor_valid", "block_tokens", "labels", "label_exists", "label_valid", "label_rows"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert "feats" not in b and b["tokens"].shape[1] >= a["feats"].shape[1]  # online: the data set's longest


def test_online_loss_and_step_equal_the_offline_ones(both):
    offline, online, params, _, _ = both
    seqs = np.array([1, 2, 4, 6])
    a = offline.batch(seqs, np.random.default_rng(7))
    b = online.batch(seqs, np.random.default_rng(7))
    la, ma = offline.loss(params, a)
    lb, mb = online.loss(params, b)
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)
    for k in ma:
        np.testing.assert_allclose(float(mb[k]), float(ma[k]), rtol=1e-5, err_msg=k)
    copy = lambda t: jax.tree.map(lambda x: jax.numpy.array(x, copy=True), t)  # noqa: E731 (the step donates)
    pa, _, sa = offline.step(copy(params), offline.init_opt(params), a)
    pb, _, sb = online.step(copy(params), online.init_opt(params), b)
    np.testing.assert_allclose(float(sb["grad_norm"]), float(sa["grad_norm"]), rtol=1e-4)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6), pb, pa)


def test_feature_scale_from_the_target_pass_matches_the_caches(tiny32, both):
    _, online, _, cache, tokens = both
    scale = feature_scale(tiny32.params, tiny32.config, tokens, online.dcfg.target_layer_ids, max_sequences=len(tokens))
    np.testing.assert_allclose(scale, cache.scale, rtol=1e-4)


def test_online_training_needs_the_targets_config(tiny32, both):
    offline, _, _, _, tokens = both
    with pytest.raises(ValueError, match="target_config"):
        Trainer(offline.dcfg, tiny32.params, tokens, offline.tcfg, inv_scale=np.asarray(offline.inv_scale), t2d=None)
