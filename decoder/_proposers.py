"""Proposers: what drafts the L-1 tokens a speculative step verifies.

A proposer is a hashable object (it is a static argument of the jitted decode phase) called
as ``proposer(params, cfg, drafter, slots, block)`` and answering a ``Proposal`` or bare
drafts [B, L-1]. The decoder builds the one its mode names (``proposer_for``); a test or a
research run passes its own to ``Decoder(..., proposer=)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dflash_batch.decoder._acceptance import NGRAM_MAX, Proposal, ProposalStats
from dflash_batch.decoder._config import TargetConfig
from dflash_batch.decoder._decode_config import MODES
from dflash_batch.decoder._drafter import draft_block, draft_to_target_ids
from dflash_batch.decoder._drafter_checkpoint import Drafter
from dflash_batch.decoder._slots import Slots
from dflash_batch.decoder._target import Params


def ngram_match(tokens: jax.Array, pos: jax.Array, n_draft: int) -> tuple[jax.Array, jax.Array]:
    """Prompt-lookup drafts [B, n_draft] and the match length [B] (0: no match): find the
    latest earlier occurrence of the row's last k tokens (k = NGRAM_MAX down to 1, longest
    match wins) and propose what followed.

    tokens [B, S] with positions <= pos [B] valid (pos holds the newest token).
    """
    b, s = tokens.shape
    idx = jnp.arange(s)[None, :]  # [1, S]
    best = jnp.full((b,), -1)
    length = jnp.zeros((b,), jnp.int32)
    for k in range(1, NGRAM_MAX + 1):  # later (longer) matches override shorter ones
        eq = (idx >= k - 1) & (idx < pos[:, None])
        for m in range(k):
            shifted = jnp.roll(tokens, m, axis=1)  # shifted[:, j] = tokens[:, j - m]
            want = jnp.take_along_axis(tokens, jnp.maximum(pos - m, 0)[:, None], axis=1)  # [B, 1]
            eq = eq & (shifted == want)
        found = jnp.max(jnp.where(eq, idx, -1), axis=1)  # [B], latest end position of a match
        best = jnp.where(found >= 0, found, best)
        length = jnp.where(found >= 0, k, length)
    take = jnp.clip(best[:, None] + 1 + jnp.arange(n_draft)[None, :], 0, pos[:, None])
    return jnp.take_along_axis(tokens, take, axis=1), length


@dataclasses.dataclass(frozen=True)
class NgramProposer:
    """Prompt lookup: the tokens that followed the latest earlier match of the row's last few."""

    needs_drafter = False

    def __call__(self, params: Params, cfg: TargetConfig, drafter, s: Slots, block: int) -> Proposal:
        del params, cfg, drafter
        drafts, match = ngram_match(s.extra.tokens, s.pos, block - 1)
        return Proposal(ngram=drafts, match=match)


@dataclasses.dataclass(frozen=True)
class DFlashProposer:
    """L-1 drafts per row from ONE drafter pass over [anchor, MASK x (L-1)], greedy."""

    needs_drafter = True

    def __call__(self, params: Params, cfg: TargetConfig, drafter: Drafter, s: Slots, block: int) -> Proposal:
        ex = s.extra
        masks = jnp.full((s.batch, block - 1), drafter.config.mask_token_id, jnp.int32)
        block_in = jnp.concatenate([s.last[:, None], masks], axis=1)  # [B, L]
        # The anchor at ``pos`` has not been through the target yet: the context holds tokens < pos.
        dlogits = draft_block(drafter.params, drafter.config, params, cfg, block_in, s.pos, ex.ctx_k, ex.ctx_v,
                              ex.ctx_len)  # [B, L-1, draft vocab]
        drafts = draft_to_target_ids(drafter.params, jnp.argmax(dlogits, axis=-1)).astype(jnp.int32)
        return Proposal(dflash=drafts, p_top=jnp.max(jax.nn.softmax(dlogits, axis=-1), axis=-1))


@dataclasses.dataclass(frozen=True)
class HybridProposer:
    """Both proposals, and per row the one that promises more accepted drafts.

    DFlash promises sum_i prod_(j<=i) p_j from its own top-1 probabilities, calibrated by
    how well that promise has held so far; an n-gram proposal promises what was accepted
    at each position so far after a match of its length. Both learn from every step
    (see ``ProposalStats``).
    """

    ngram: NgramProposer = NgramProposer()
    dflash: DFlashProposer = DFlashProposer()
    needs_drafter = True

    def __call__(self, params: Params, cfg: TargetConfig, drafter: Drafter, s: Slots, block: int) -> Proposal:
        st: ProposalStats = s.extra.stats
        lookup = self.ngram(params, cfg, drafter, s, block)
        both = self.dflash(params, cfg, drafter, s, block).replace(ngram=lookup.ngram, match=lookup.match)
        promise_n = st.ngram_promise(both.match, block - 1)
        return both.replace(use_ngram=(both.match > 0) & (promise_n > st.dflash_promise(both.p_top)))


def as_proposal(drafts, batch: int) -> Proposal:
    """A proposer's answer as a Proposal: bare drafts [B, L-1] are judged like an n-gram
    proposal without a match (by the acceptance seen so far, table row 0)."""
    if isinstance(drafts, Proposal):
        return drafts
    return Proposal(ngram=drafts, match=jnp.zeros((batch,), jnp.int32))


def proposer_for(mode: str):
    """The proposer a decode mode names (None for ``ar``)."""
    table = {"ar": None, "dflash": DFlashProposer(), "ngram": NgramProposer(), "hybrid": HybridProposer()}
    if mode not in table:
        raise ValueError(f"mode must be one of {'/'.join(MODES)}, got {mode!r}")
    return table[mode]
