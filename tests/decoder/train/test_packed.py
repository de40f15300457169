"""The packed training forward: each block sees exactly what its decode step would see."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dflash_batch.decoder._drafter import context_kv, draft_block
from dflash_batch.decoder.train import (
    DrafterSpec, attention_mask, drafter_config, export_params, init_params, packed_draft_logits,
)

S, L = 24, 4
_packed_logits = jax.jit(packed_draft_logits, static_argnums=1)
_draft_block = jax.jit(draft_block, static_argnums=(1, 3))
ANCHORS = np.array([[5, 11, 17], [3, 9, 20]], np.int32)  # [B, A]


def test_mask_hides_context_at_and_after_the_anchor_and_other_blocks():
    m = np.asarray(attention_mask(jnp.asarray(ANCHORS), S, L))  # [B, A*L, S + A*L]
    b, a = ANCHORS.shape
    assert m.shape == (b, a * L, S + a * L)
    for bi in range(b):
        for ai in range(a):
            rows = m[bi, ai * L : (ai + 1) * L]  # the L queries of block ai
            p = ANCHORS[bi, ai]
            assert rows[:, :p].all(), "context strictly before the anchor is visible"
            assert not rows[:, p:S].any(), "context at or after the anchor is hidden"
            own = np.zeros(a * L, bool)
            own[ai * L : (ai + 1) * L] = True
            assert (rows[:, S:] == own).all(), "only the block's own rows, all of them (no causal mask)"


@pytest.fixture(scope="module")
def drafter(tiny_llama):
    spec = DrafterSpec(num_layers=2, block_size=L, target_layer_ids=(0, 2), draft_vocab_size=None,
                       source_layers=(1, 2))
    dcfg = drafter_config(spec, tiny_llama)
    rng = np.random.default_rng(0)
    inv_scale = rng.uniform(0.5, 2.0, size=(2, dcfg.hidden_size)).astype(np.float32)
    params = init_params(dcfg, tiny_llama.params, tiny_llama.config, jax.random.PRNGKey(0), inv_scale=inv_scale)
    # Perturb every weight so that no part of the forward is an identity by construction.
    params = jax.tree.map(lambda x: x * (1 + 0.2 * jax.random.normal(jax.random.PRNGKey(1), x.shape)), params)
    feats = (3 * rng.normal(size=(2, S, 2, dcfg.hidden_size))).astype(np.float32)
    tokens = np.full(ANCHORS.shape + (L,), dcfg.mask_token_id, np.int32)
    tokens[..., 0] = rng.integers(3, dcfg.vocab_size, size=ANCHORS.shape)
    return dcfg, params, inv_scale, feats, tokens


def _packed(tiny_llama, drafter, feats):
    dcfg, params, inv_scale, _, tokens = drafter
    return np.asarray(_packed_logits(params, dcfg, tiny_llama.params, jnp.asarray(feats), jnp.asarray(inv_scale),
                                          jnp.asarray(tokens), jnp.asarray(ANCHORS)))


def test_context_at_or_after_the_anchor_cannot_change_a_block(tiny_llama, drafter):
    feats = drafter[3]
    base = _packed(tiny_llama, drafter, feats)
    for ai in range(ANCHORS.shape[1]):
        poisoned = feats.copy()
        for bi in range(ANCHORS.shape[0]):
            poisoned[bi, ANCHORS[bi, ai]:] = 1e3  # the anchor's own row and everything after it
        out = _packed(tiny_llama, drafter, poisoned)
        np.testing.assert_array_equal(out[:, ai], base[:, ai])
        if ai + 1 < ANCHORS.shape[1]:  # a later block does see some of those rows
            assert np.abs(out[:, ai + 1] - base[:, ai + 1]).max() > 1e-3
    before = feats.copy()
    before[np.arange(2), ANCHORS[:, 0] - 1] += 1.0  # the row just before the first anchor
    assert (np.abs(_packed(tiny_llama, drafter, before)[:, 0] - base[:, 0]).max(axis=-1) > 1e-4).all()


def test_packed_blocks_equal_the_decoders_drafter_pass(tiny_llama, drafter):
    """Training computes what inference computes: ``context_kv`` + ``draft_block`` with
    ctx_len = anchor position, on the exported (standardisation folded) weights."""
    dcfg, params, inv_scale, feats, tokens = drafter
    packed = _packed(tiny_llama, drafter, feats)
    exported = export_params(params, inv_scale)
    k, v = context_kv(exported, dcfg, jnp.asarray(feats), jnp.broadcast_to(jnp.arange(S), (2, S)))
    k, v = jnp.swapaxes(k, 2, 3), jnp.swapaxes(v, 2, 3)  # the decoder caches [Ld, B, K, S, H]
    for ai in range(ANCHORS.shape[1]):
        pos = jnp.asarray(ANCHORS[:, ai])
        ref = _draft_block(exported, dcfg, tiny_llama.params, tiny_llama.config, jnp.asarray(tokens[:, ai]), pos, k, v,
                          pos)
        np.testing.assert_allclose(packed[:, ai], np.asarray(ref), atol=2e-4, rtol=2e-4)
