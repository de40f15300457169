"""Online training computes in the step exactly what the offline path reads from its feature cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_training import SPEC, TRAIN

from dflash_batch.decoder import KVCache, forward
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


def _same_blocks_same_loss(offline, online, params, seqs, seed):
    """Both trainers' batches of ``seqs`` from the same anchor draw, and their losses (asserted equal)."""
    a = offline.batch(np.asarray(seqs), np.random.default_rng(seed))
    b = online.batch(np.asarray(seqs), np.random.default_rng(seed))
    (la, ma), (lb, mb) = offline.loss(params, a), online.loss(params, b)
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)
    return a, b, ma, mb


@pytest.mark.slow
def test_online_loss_and_step_equal_the_offline_ones(both):
    offline, online, params, _, _ = both
    a, b, ma, mb = _same_blocks_same_loss(offline, online, params, [1, 2, 4, 6], seed=7)
    for k in ma:
        np.testing.assert_allclose(float(mb[k]), float(ma[k]), rtol=1e-5, err_msg=k)
    copy = lambda t: jax.tree.map(lambda x: jax.numpy.array(x, copy=True), t)  # noqa: E731 (the step donates)
    pa, _, sa = offline.step(copy(params), offline.init_opt(params), a)
    pb, _, sb = online.step(copy(params), online.init_opt(params), b)
    np.testing.assert_allclose(float(sb["grad_norm"]), float(sa["grad_norm"]), rtol=1e-4)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6), pb, pa)


@pytest.mark.slow
def test_full_teacher_is_the_targets_own_logits_online_and_offline(tiny32, both):
    """teacher="full": the teacher logits are the target's logits at each label's row over the
    draft vocabulary, from the cached head input (offline) as from the live target pass (online)."""
    offline, online, params, cache, tokens = both
    full = dataclasses.replace(offline.tcfg, teacher="full")
    inv, t2d = np.asarray(offline.inv_scale), offline.t2d
    off_full = Trainer(offline.dcfg, offline.target_params, cache, full, inv_scale=inv, t2d=t2d)
    on_full = Trainer(online.dcfg, online.target_params, tokens, full, inv_scale=inv, t2d=t2d,
                      target_config=online.target_config)
    seqs = [0, 2, 5, 7]
    a, _, _, _ = _same_blocks_same_loss(off_full, on_full, params, seqs, seed=9)
    d2t = params["d2t"]
    teacher = np.asarray(off_full._inputs(off_full.target_params, d2t, a)["teacher_logits"])  # [B, A, L-1, V']
    for row, i in enumerate(seqs):
        toks = jnp.asarray(tokens.tokens[tokens.rows(int(i))])[None]
        logits, _, _ = forward(tiny32.params, tiny32.config, toks, jnp.zeros((1,), jnp.int32),
                               KVCache.init(tiny32.config, 1, toks.shape[1]))
        want = np.asarray(logits[0])[a["label_rows"][row]][..., np.asarray(d2t)]
        np.testing.assert_allclose(teacher[row], want, atol=2e-2)  # the head input is stored as fp16


def test_feature_scale_from_the_target_pass_matches_the_caches(tiny32, both):
    _, online, _, cache, tokens = both
    scale = feature_scale(tiny32.params, tiny32.config, tokens, online.dcfg.target_layer_ids, max_sequences=len(tokens))
    np.testing.assert_allclose(scale, cache.scale, rtol=1e-4)


def test_online_training_needs_the_targets_config(tiny32, both):
    offline, _, _, _, tokens = both
    with pytest.raises(ValueError, match="target_config"):
        Trainer(offline.dcfg, tiny32.params, tokens, offline.tcfg, inv_scale=np.asarray(offline.inv_scale), t2d=None)
