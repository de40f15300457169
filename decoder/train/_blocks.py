"""Anchor sampling and block construction: from cached sequences to one packed training batch.

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
Many anchors (A) share one sequence's context features, so one cached target pass feeds
A blocks (the attention rule that keeps them apart lives in ``_packed``).

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


def make_batch(cache: FeatureCache, seqs: np.ndarray, rng: np.random.Generator, *, n_anchors: int, block_size: int,
               seq_len: int, mask_token_id: int, t2d: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One packed batch from sequences ``seqs`` [B] of ``cache``.

    Returns numpy arrays:
      feats [B, S, n_f, D] fp16 (zero past each sequence), anchor_pos [B, A] int32,
      anchor_valid [B, A] bool, block_tokens [B, A, L] int32,
      labels [B, A, L-1] int32 (draft ids; 0 where invalid), label_exists [B, A, L-1] bool
      (the position is inside the sequence), label_valid [B, A, L-1] bool (it exists and
      the drafter can propose it: the hard-label loss uses these),
      soft_ids [B, A, L-1, k] int32 (draft ids), soft_probs [B, A, L-1, k] float32
      (sums to 1 over each valid label's in-vocabulary top-k entries, 0 elsewhere).
    """
    b, a, blk, k = len(seqs), n_anchors, block_size, cache.topk_ids.shape[1]
    n_f, d = cache.feats.shape[1:]
    out = {
        "feats": np.zeros((b, seq_len, n_f, d), np.float16),
        "anchor_pos": np.zeros((b, a), np.int32),
        "anchor_valid": np.zeros((b, a), bool),
        "block_tokens": np.full((b, a, blk), mask_token_id, np.int32),
        "labels": np.zeros((b, a, blk - 1), np.int32),
        "label_exists": np.zeros((b, a, blk - 1), bool),
        "label_valid": np.zeros((b, a, blk - 1), bool),
        "soft_ids": np.zeros((b, a, blk - 1, k), np.int32),
        "soft_probs": np.zeros((b, a, blk - 1, k), np.float32),
    }
    offs = np.arange(1, blk)  # [L-1]
    for row, i in enumerate(seqs):
        r = cache.rows(int(i))
        n = r.stop - r.start
        if n > seq_len:
            raise ValueError(f"sequence {cache.ids[i]!r} has {n} tokens, more than the batch length {seq_len=}")
        toks = cache.tokens[r]
        out["feats"][row, :n] = cache.feats[r]
        anchors, valid = sample_anchors(rng, int(cache.prompt_lens[i]), n, a)
        out["anchor_pos"][row], out["anchor_valid"][row] = anchors, valid
        out["block_tokens"][row, :, 0] = toks[anchors]
        pos = anchors[:, None] + offs[None, :]  # [A, L-1] label positions
        ok = (pos < n) & valid[:, None]
        pos_c = np.minimum(pos, n - 1)
        lab = toks[pos_c]  # [A, L-1] target ids
        sid = np.asarray(cache.topk_ids[r])[pos_c - 1]  # [A, L-1, k]: the distribution of token pos
        sp = np.asarray(cache.topk_probs[r], np.float32)[pos_c - 1]
        if t2d is not None:
            lab = t2d[lab]
            ok_hard = ok & (lab >= 0)
            sid = t2d[sid]
            sp = np.where(sid >= 0, sp, 0.0)
            sid = np.maximum(sid, 0)
            lab = np.maximum(lab, 0)
        else:
            ok_hard = ok
        total = sp.sum(-1, keepdims=True)
        sp = np.where(ok[..., None] & (total > 0), sp / np.maximum(total, 1e-20), 0.0)
        out["labels"][row], out["label_valid"][row], out["label_exists"][row] = lab, ok_hard, ok
        out["soft_ids"][row], out["soft_probs"][row] = sid, sp
    return out
