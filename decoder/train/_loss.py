"""The block-diffusion loss: position-weighted cross-entropy to the target's tokens and
distributions, plus the acceptance metrics that predict tau.

Block position k (1..L-1) drafts x_(anchor+k). A draft at position k is only useful if
positions 1..k-1 were accepted too, so early positions matter most: the loss weight is
exp(-(k-1)/gamma) (DFlash paper: gamma 7 for L=16, 5 for L=10, 4 for L=8).

Two targets per position, mixed by ``distill`` (0: hard labels only, 1: distributions only):
  * hard: -log p(x_(anchor+k)), the token the target will verify (its greedy choice);
  * soft: cross-entropy to the target's own distribution of that token (the KL up to a
    constant). It carries the target's uncertainty for free (the logits come with the
    feature pass) and gives more vocabulary rows a gradient than the argmax's. The teacher
    is either its top-k entries (``soft_ids``/``soft_probs``), or, when the batch holds
    ``teacher_logits``, its whole distribution over the draft vocabulary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# The paper's decay per block size; other sizes interpolate linearly (clamped at the ends).
PAPER_GAMMA = {8: 4.0, 10: 5.0, 16: 7.0}


def default_gamma(block_size: int) -> float:
    """gamma for ``block_size``: the paper's value, else linear interpolation between them."""
    sizes = sorted(PAPER_GAMMA)
    return float(np.interp(block_size, sizes, [PAPER_GAMMA[s] for s in sizes]))


def loss_weights(block_size: int, gamma: float | None = None) -> np.ndarray:
    """w [L-1] float32, w[k-1] = exp(-(k-1)/gamma) for block positions k = 1..L-1."""
    if block_size < 2:
        raise ValueError(f"{block_size=} must be >= 2")
    gamma = default_gamma(block_size) if gamma is None else float(gamma)
    if not gamma > 0:
        raise ValueError(f"{gamma=} must be > 0")
    return np.array([math.exp(-(k - 1) / gamma) for k in range(1, block_size)], np.float32)


def block_loss(logits: jax.Array, batch: dict, weights: jax.Array, distill: float) -> tuple[jax.Array, dict]:
    """Weighted loss over all valid block positions, and metrics.

    logits [B, A, L-1, V'] fp32; batch holds ``labels``, ``label_valid``, ``label_exists``
    [B, A, L-1], ``soft_ids``, ``soft_probs`` [B, A, L-1, k] and ``anchor_valid`` [B, A]
    (see ``_blocks.make_batch``); weights [L-1]. With ``teacher_logits`` [B, A, L-1, V'] in
    ``batch`` the soft term is the cross-entropy to their softmax instead of the top-k.
    Returns (loss, metrics) with metrics:
      acc1: top-1 accuracy at block position 1;
      acc: top-1 accuracy over all positions with a label;
      tau: mean accepted length + 1 over the batch's blocks: what a block anchored at a
        random position commits (drafts are made from masks, never from labels, so the
        training forward is the inference forward);
      tau_h: the harmonic mean of the same. Decoding visits anchors where acceptance is
        short more often (a step that commits 1 token is followed by another anchor one
        position later), so the decoder's tokens-per-step is close to the harmonic mean
        over positions, not the arithmetic one. Both are slightly low near response ends.
    """
    logp = jax.nn.log_softmax(logits, axis=-1)  # [B, A, L-1, V']
    w = weights[None, None, :]
    hard_ok = batch["label_valid"]
    exists = batch["label_exists"]
    hard = -jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]  # [B, A, L-1]
    if "teacher_logits" in batch:
        soft = -jnp.sum(jax.nn.softmax(batch["teacher_logits"], axis=-1) * logp, axis=-1)
        has_soft = exists
    else:
        soft = -jnp.sum(jnp.take_along_axis(logp, batch["soft_ids"], axis=-1) * batch["soft_probs"], axis=-1)
        has_soft = jnp.sum(batch["soft_probs"], axis=-1) > 0
    w_hard = w * hard_ok * (1.0 - distill)
    w_soft = w * has_soft * distill
    denom = jnp.maximum(jnp.sum(w * exists), 1e-6)
    loss = (jnp.sum(w_hard * hard) + jnp.sum(w_soft * soft)) / denom

    correct = (jnp.argmax(logits, axis=-1) == batch["labels"]) & hard_ok  # [B, A, L-1]
    n_exist = jnp.maximum(jnp.sum(exists), 1)
    run = jnp.sum(jnp.cumprod(correct | ~exists, axis=-1) * exists, axis=-1)  # accepted drafts per block
    valid = batch["anchor_valid"]
    metrics = {
        "loss": loss,
        "acc1": jnp.sum(correct[..., 0]) / jnp.maximum(jnp.sum(exists[..., 0]), 1),
        "acc": jnp.sum(correct) / n_exist,
        "tau": 1.0 + jnp.sum(run * valid) / jnp.maximum(jnp.sum(valid), 1),
        "tau_h": jnp.sum(valid) / jnp.maximum(jnp.sum(valid / (1.0 + run)), 1e-6),
    }
    return loss, metrics
