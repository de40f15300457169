"""Anchor sampling and block construction: from training sequences to one packed batch.

A training block mirrors one decode step exactly. At inference the anchor is the last
committed token, at position p, not yet run through the target; the drafter sees the
context features of rows < p and the block [x_p, MASK x (L-1)] at positions p..p+L-1,
and block position k drafts x_(p+k). So a block here is:
  1. an anchor position p inside the response (p >= prompt length: the first decode step
     anchors on the first response token), with at least one label after it;
  2. block tokens [x_p, MASK, ..., MASK];
  3. labels x_(p+1)..x_(p+L-1), invalid past the end of the sequence (and, with a
     reduced vocabulary, where the token has no draft id);
  4. soft labels: the target's top-k distribution of each of those tokens (row p+k-1
     of the cache), mapped to draft ids and renormalised over the ids the drafter has.
Many anchors (A) share one sequence's context features, so one target pass feeds A blocks
(the attention rule that keeps them apart lives in ``_packed``).

Offline training reads the target's outputs from the feature cache (``make_batch``);
online training carries only tokens (``make_token_batch``) and runs the target inside the
step. Both draw their blocks with ``sample_blocks`` and map soft labels with
``draft_soft_labels``, so the two paths train on the same blocks.

Axes: B sequences, A anchors per sequence, L block, S padded sequence length, k top-k.
"""

from __future__ import annotations

import numpy as np

from dflash_batch.decoder.train._features import FeatureCache


def sample_anchors(rng: np.random.Generator, prompt_len: int, seq_len: int, n_anchors: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n_anchors`` distinct anchor positions in [prompt_len, seq_len - 2], sorted.

    Returns (anchors [A] int32, valid [A] bool); a short response fills fewer slots and
    the rest are marked invalid (their position repeats the last valid one).
    """
    lo, hi = prompt_len, seq_len - 2  # the last token has nothing left to predict
    n_pos = hi - lo + 1
    anchors = np.full(n_anchors, max(lo, 0), np.int32)
    valid = np.zeros(n_anchors, bool)
    if n_pos <= 0:
        return anchors, valid
    m = min(n_anchors, n_pos)
    chosen = np.sort(rng.choice(n_pos, size=m, replace=False)) + lo
    anchors[:m], valid[:m] = chosen, True
    anchors[m:] = chosen[-1]
    return anchors, valid


def sample_blocks(tokens: np.ndarray, prompt_len: int, rng: np.random.Generator, *, n_anchors: int,
                  block_size: int, mask_token_id: int, t2d: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The blocks of one sequence ``tokens`` [n]: the part of a batch that needs no target.

    Returns anchor_pos [A], anchor_valid [A], block_tokens [A, L], labels [A, L-1] (draft
    ids; 0 where invalid), label_exists [A, L-1], label_valid [A, L-1], and label_rows
    [A, L-1]: the row whose next-token distribution is each label's soft label (row p+k-1
    for label x_(p+k); clamped inside the sequence).
    """
    n, offs = len(tokens), np.arange(1, block_size)  # offs [L-1]
    anchors, valid = sample_anchors(rng, prompt_len, n, n_anchors)
    block = np.full((n_anchors, block_size), mask_token_id, np.int32)
    block[:, 0] = tokens[anchors]
    pos = anchors[:, None] + offs[None, :]  # [A, L-1] label positions
    exists = (pos < n) & valid[:, None]
    pos_c = np.minimum(pos, n - 1)
    labels = tokens[pos_c]  # [A, L-1] target ids
    ok_hard = exists
    if t2d is not None:
        labels = t2d[labels]
        ok_hard = exists & (labels >= 0)
        labels = np.maximum(labels, 0)
    return {"anchor_pos": anchors, "anchor_valid": valid, "block_tokens": block, "labels": labels.astype(np.int32),
            "label_exists": exists, "label_valid": ok_hard, "label_rows": (pos_c - 1).astype(np.int32)}


def draft_soft_labels(ids, probs, exists, t2d, xp=np):
    """The target's top-k distribution of each label as draft ids, renormalised over the
    entries the drafter can propose; zero where the label does not exist.

    ids [..., k] target ids, probs [..., k], exists [...]; t2d [V] or None. ``xp`` is numpy
    (the offline batch) or jax.numpy (inside the online step): one rule for both paths.
    Returns (soft_ids [..., k] int32, soft_probs [..., k] float32).
    """
    probs = probs.astype(xp.float32)
    if t2d is not None:
        ids = t2d[ids]
        probs = xp.where(ids >= 0, probs, 0.0)
        ids = xp.maximum(ids, 0)
    total = probs.sum(-1, keepdims=True)
    probs = xp.where(exists[..., None] & (total > 0), probs / xp.maximum(total, 1e-20), 0.0)
    return ids.astype(xp.int32), probs


def _empty_blocks(b: int, a: int, blk: int) -> dict[str, np.ndarray]:
    return {
        "anchor_pos": np.zeros((b, a), np.int32),
        "anchor_valid": np.zeros((b, a), bool),
        "block_tokens": np.zeros((b, a, blk), np.int32),
        "labels": np.zeros((b, a, blk - 1), np.int32),
        "label_exists": np.zeros((b, a, blk - 1), bool),
        "label_valid": np.zeros((b, a, blk - 1), bool),
        "label_rows": np.zeros((b, a, blk - 1), np.int32),
    }


def _fill_blocks(out: dict, row: int, blocks: dict) -> None:
    for k, v in blocks.items():
        out[k][row] = v


def make_batch(cache: FeatureCache, seqs: np.ndarray, rng: np.random.Generator, *, n_anchors: int, block_size: int,
               seq_len: int, mask_token_id: int, t2d: np.ndarray | None = None, head_in: bool = False
               ) -> dict[str, np.ndarray]:
    """One packed batch from sequences ``seqs`` [B] of ``cache`` (offline training).

    Returns numpy arrays: the blocks of ``sample_blocks`` stacked over B, and
      feats [B, S, n_f, D] fp16 (zero past each sequence),
      soft_ids [B, A, L-1, k] int32 (draft ids), soft_probs [B, A, L-1, k] float32
      (sums to 1 over each valid label's in-vocabulary top-k entries, 0 elsewhere),
      with ``head_in``, head_in [B, A, L-1, D] fp16: the target's output-head input at each label's
      row (the whole teacher distribution is computed from it in the step: ``TrainConfig.teacher``).
    """
    b, a, blk, k = len(seqs), n_anchors, block_size, cache.topk_ids.shape[1]
    n_f, d = cache.feats.shape[1:]
    out = _empty_blocks(b, a, blk)
    out["feats"] = np.zeros((b, seq_len, n_f, d), np.float16)
    out["soft_ids"] = np.zeros((b, a, blk - 1, k), np.int32)
    out["soft_probs"] = np.zeros((b, a, blk - 1, k), np.float32)
    if head_in:
        out["head_in"] = np.zeros((b, a, blk - 1, d), np.float16)
    for row, i in enumerate(seqs):
        r = cache.rows(int(i))
        n = r.stop - r.start
        if n > seq_len:
            raise ValueError(f"sequence {cache.ids[i]!r} has {n} tokens, more than the batch length {seq_len=}")
        blocks = sample_blocks(cache.tokens[r], int(cache.prompt_lens[i]), rng, n_anchors=a, block_size=blk,
                               mask_token_id=mask_token_id, t2d=t2d)
        _fill_blocks(out, row, blocks)
        out["feats"][row, :n] = cache.feats[r]
        rows = blocks["label_rows"]
        out["soft_ids"][row], out["soft_probs"][row] = draft_soft_labels(
            np.asarray(cache.topk_ids[r])[rows], np.asarray(cache.topk_probs[r])[rows], blocks["label_exists"], t2d)
        if head_in:
            out["head_in"][row] = np.asarray(cache.head_in[r])[rows]
    return out


def make_token_batch(data, seqs: np.ndarray, rng: np.random.Generator, *, n_anchors: int, block_size: int,
                     seq_len: int, mask_token_id: int, t2d: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One packed batch of tokens only (online training: the step runs the target itself).

    ``data`` has ``ids``, ``tokens``, ``prompt_lens`` and ``rows(i)`` (a ``TokenSequences``
    or a ``FeatureCache``). Returns the blocks of ``sample_blocks`` stacked over B, and
    tokens [B, S] int32 (zero past each sequence). With the same ``rng`` state it draws the
    same blocks as ``make_batch``.
    """
    b = len(seqs)
    out = _empty_blocks(b, n_anchors, block_size)
    out["tokens"] = np.zeros((b, seq_len), np.int32)
    for row, i in enumerate(seqs):
        toks = data.tokens[data.rows(int(i))]
        if len(toks) > seq_len:
            raise ValueError(f"sequence {data.ids[i]!r} has {len(toks)} tokens, more than the batch length {seq_len=}")
        _fill_blocks(out, row, sample_blocks(toks, int(data.prompt_lens[i]), rng, n_anchors=n_anchors,
                                             block_size=block_size, mask_token_id=mask_token_id, t2d=t2d))
        out["tokens"][row, : len(toks)] = toks
    return out
