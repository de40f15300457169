"""The block-diffusion loss: position weights and how they enter the loss."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from dflash_batch.decoder.train import block_loss, default_gamma, loss_weights


@pytest.mark.parametrize("block, gamma", [(16, 7.0), (10, 5.0), (8, 4.0)])
def test_weights_follow_the_paper_formula(block, gamma):
    assert default_gamma(block) == gamma
    want = [math.exp(-(k - 1) / gamma) for k in range(1, block)]  # block position k = 1..L-1
    np.testing.assert_allclose(loss_weights(block), want, rtol=1e-6)
    assert loss_weights(block)[0] == 1.0


def test_explicit_gamma_overrides_and_bad_values_are_refused():
    np.testing.assert_allclose(loss_weights(4, gamma=2.0), [1.0, math.exp(-0.5), math.exp(-1.0)], rtol=1e-6)
    with pytest.raises(ValueError, match="gamma"):
        loss_weights(4, gamma=0.0)


def _batch(labels, valid):
    b, a, l1 = labels.shape
    return {"labels": jnp.asarray(labels), "label_valid": jnp.asarray(valid), "label_exists": jnp.asarray(valid),
            "soft_ids": jnp.asarray(labels)[..., None], "soft_probs": jnp.asarray(valid, jnp.float32)[..., None],
            "anchor_valid": jnp.ones((b, a), bool)}


def test_loss_is_the_weighted_mean_of_position_losses():
    """Each position's cross-entropy counts with its weight; invalid positions not at all."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5, 11)).astype(np.float32)
    labels = rng.integers(0, 11, size=(2, 3, 5))
    valid = rng.random((2, 3, 5)) > 0.3
    w = loss_weights(6)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    want = (ce * w * valid).sum() / (w * valid).sum()
    for distill in (0.0, 1.0, 0.3):  # one-hot soft labels: hard and soft terms agree
        loss, m = block_loss(jnp.asarray(logits), _batch(labels, valid), jnp.asarray(w), distill)
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_full_teacher_loss_is_the_cross_entropy_to_the_teachers_whole_distribution():
    """With teacher logits the soft term is -sum_v softmax(teacher)_v log p_v over every draft id,
    so it differs from the top-1 rule (a test that would pass with the top-k path would fail here)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 5, 11)).astype(np.float32)
    teacher = rng.normal(size=(2, 3, 5, 11)).astype(np.float32) * 2
    labels = rng.integers(0, 11, size=(2, 3, 5))
    valid = rng.random((2, 3, 5)) > 0.3
    w = loss_weights(6)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    q = np.exp(teacher) / np.exp(teacher).sum(-1, keepdims=True)
    soft = -(q * logp).sum(-1)
    hard = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    batch = dict(_batch(labels, valid), teacher_logits=jnp.asarray(teacher))
    for distill in (1.0, 0.4):
        want = (w * valid * ((1 - distill) * hard + distill * soft)).sum() / (w * valid).sum()
        loss, _ = block_loss(jnp.asarray(logits), batch, jnp.asarray(w), distill)
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    top1, _ = block_loss(jnp.asarray(logits), _batch(labels, valid), jnp.asarray(w), 1.0)
    assert abs(float(top1) - (w * valid * soft).sum() / (w * valid).sum()) > 1e-2


def test_accepted_length_metric_stops_at_the_first_miss():
    labels = np.zeros((1, 2, 4), np.int64)
    logits = np.full((1, 2, 4, 3), -5.0, np.float32)
    logits[0, 0, :, 0] = 5.0  # block 0: all four right -> 4 accepted
    logits[0, 1, [0, 2, 3], 0] = 5.0  # block 1: right, wrong, right, right -> 1 accepted
    logits[0, 1, 1, 2] = 5.0
    _, m = block_loss(jnp.asarray(logits), _batch(labels, np.ones((1, 2, 4), bool)), jnp.ones(4), 0.5)
    assert float(m["tau"]) == pytest.approx(1 + (4 + 1) / 2)
    assert float(m["tau_h"]) == pytest.approx(2 / (1 / 5 + 1 / 2))
    assert float(m["acc1"]) == 1.0
