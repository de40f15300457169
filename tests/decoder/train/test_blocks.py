"""Anchor sampling and block construction from cached sequences."""

from __future__ import annotations

import numpy as np

from dflash_batch.decoder.train import FeatureCache, make_batch, sample_anchors, target_to_draft


def test_anchors_are_distinct_positions_inside_the_response_with_a_label_after_them():
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = int(rng.integers(1, 20))
        n = p + int(rng.integers(10, 40))
        a, ok = sample_anchors(rng, p, n, 8)
        assert ok.all() and len(set(a.tolist())) == 8
        assert (a >= p).all() and (a <= n - 2).all() and (np.diff(a) > 0).all()


def test_a_short_response_fills_fewer_anchor_slots():
    a, ok = sample_anchors(np.random.default_rng(0), 10, 13, 8)  # positions 10 and 11 only
    assert ok.tolist() == [True, True] + [False] * 6
    assert sorted(a[ok].tolist()) == [10, 11]


def _cache(n_f=1, d=2, k=3):
    """Two sequences: prompt 3 + response 5, prompt 2 + response 4; token t = 10 * seq + pos."""
    lens, plens = [8, 6], [3, 2]
    tokens = np.concatenate([10 * i + np.arange(n) for i, n in enumerate(lens)]).astype(np.int32)
    rows = len(tokens)
    topk_ids = np.stack([tokens + 1, tokens + 2, tokens + 3], axis=1)  # the "distribution" of row t's next token
    topk_probs = np.tile(np.array([0.5, 0.3, 0.2], np.float16), (rows, 1))
    feats = np.arange(rows * n_f * d, dtype=np.float16).reshape(rows, n_f, d)
    head_in = np.arange(rows * d, dtype=np.float16).reshape(rows, d) + 1000  # row t's head input
    return FeatureCache(folder=None, ids=["a", "b"], tokens=tokens, offsets=np.array([0, 8, 14]),
                        prompt_lens=np.array(plens, np.int32), feats=feats, topk_ids=topk_ids, topk_probs=topk_probs,
                        head_in=head_in, scale=np.ones((n_f, d), np.float32), layer_ids=(0,))


def test_block_is_anchor_then_masks_and_labels_are_the_following_tokens():
    c = _cache()
    b = make_batch(c, np.array([0, 1]), np.random.default_rng(0), n_anchors=3, block_size=4, seq_len=8,
                   mask_token_id=99, head_in=True)
    for row, seq in enumerate([0, 1]):
        toks = c.tokens[c.rows(seq)]
        n = len(toks)
        np.testing.assert_array_equal(b["feats"][row, :n], c.feats[c.rows(seq)])
        assert (b["feats"][row, n:] == 0).all()
        for ai in np.flatnonzero(b["anchor_valid"][row]):
            p = b["anchor_pos"][row, ai]
            assert b["block_tokens"][row, ai].tolist() == [toks[p], 99, 99, 99]
            for k in range(1, 4):
                exists = p + k < n
                assert b["label_exists"][row, ai, k - 1] == exists
                if exists:
                    assert b["labels"][row, ai, k - 1] == toks[p + k]
                    # soft label of x_(p+k): the distribution cached at row p+k-1
                    assert b["soft_ids"][row, ai, k - 1].tolist() == [toks[p + k - 1] + j for j in (1, 2, 3)]
                    np.testing.assert_allclose(b["soft_probs"][row, ai, k - 1], [0.5, 0.3, 0.2], atol=1e-3)
                    # and the head input of that same row (the full teacher's source)
                    np.testing.assert_array_equal(b["head_in"][row, ai, k - 1], c.head_in[c.rows(seq)][p + k - 1])
                else:
                    assert b["soft_probs"][row, ai, k - 1].sum() == 0


def test_reduced_vocabulary_maps_labels_and_renormalises_soft_labels():
    c = _cache()
    d2t = np.array([4, 5, 6, 15, 16, 17], np.int32)  # some of sequence a's and b's tokens
    t2d = target_to_draft(d2t, 32)
    b = make_batch(c, np.array([0]), np.random.default_rng(1), n_anchors=5, block_size=2, seq_len=8,
                   mask_token_id=0, t2d=t2d)
    toks = c.tokens[c.rows(0)]
    assert b["anchor_valid"][0].sum() == 4  # response positions 3..6
    for ai in np.flatnonzero(b["anchor_valid"][0]):
        p = b["anchor_pos"][0, ai]
        label = toks[p + 1]
        assert b["label_valid"][0, ai, 0] == (label in d2t)
        if label in d2t:
            assert d2t[b["labels"][0, ai, 0]] == label
        probs, ids = b["soft_probs"][0, ai, 0], b["soft_ids"][0, ai, 0]
        in_vocab = np.isin(toks[p] + np.array([1, 2, 3]), d2t)
        if in_vocab.any():
            np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-3)
            assert (probs[~in_vocab] == 0).all()
            assert (d2t[ids[in_vocab]] == (toks[p] + np.array([1, 2, 3]))[in_vocab]).all()
