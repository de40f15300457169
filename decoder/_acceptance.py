"""Acceptance, in one place: what the decoder learns about its proposals, on the device and on the host.

The device counts; the host reads the counts. Two questions are asked of the same evidence:

- **Which proposal should this row verify now?** ``ProposalStats`` (device) keeps acceptance
  per proposer and draft position. Before verification, the per-step gate and the hybrid
  chooser weigh each row's proposals by it (``Proposal.promise``); after, ``learn`` adds the
  step's evidence.
- **Which block length should the next call use?** ``AcceptanceTally`` (host) keeps q_k =
  P(at least k drafts accepted) of the proposals that were verified, read from the
  committed-token histogram and the gated-step count each decode call returns. The block
  policy (decoder/_autoblock.py) and the lazy compile (decoder/_lazy_blocks.py) read q_k here.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

NGRAM_MAX = 3  # longest suffix the n-gram proposer tries to match


@flax.struct.dataclass
class ProposalStats:
    """What the decoder has learnt about its proposals, over the whole batch.

    Acceptance is kept per draft position as conditional rates (a Kaplan-Meier table):
    a try at position j is a step where drafts 1..j-1 were accepted and the target's
    token at j is known; a hit is a try whose draft j matched it too. P(at least k
    drafts accepted) is the product of the rates up to k. Steps that verified another
    proposal, or none (gated), still tell how far this one would have been accepted, up
    to what was committed, so every proposal learns from every step.

    ngram_hits, ngram_tries [NGRAM_MAX + 1, L-1]: n-gram proposals by match length (0: no
      match) and position; proposers other than the n-gram and DFlash use row 0;
    dflash_acc, dflash_pred: accepted DFlash drafts, and the drafter's own expectation of
      them over the same positions, summed: their ratio calibrates its confidence;
    chose_ngram, chose_dflash: row-steps that verified each source (``hybrid``);
    gated: row-steps the gate ran as plain AR steps.
    """

    ngram_hits: jax.Array
    ngram_tries: jax.Array
    dflash_acc: jax.Array
    dflash_pred: jax.Array
    chose_ngram: jax.Array
    chose_dflash: jax.Array
    gated: jax.Array

    @classmethod
    def init(cls, n_drafts: int) -> "ProposalStats":
        # One optimistic pseudo-observation (a hit) everywhere, so every proposal is tried
        # before data decide.
        shape = (NGRAM_MAX + 1, max(n_drafts, 1))  # separate buffers: the state is donated
        return cls(ngram_hits=jnp.ones(shape, jnp.float32), ngram_tries=jnp.ones(shape, jnp.float32),
                   dflash_acc=jnp.float32(1), dflash_pred=jnp.float32(1),
                   chose_ngram=jnp.int32(0), chose_dflash=jnp.int32(0), gated=jnp.int32(0))

    def ngram_promise(self, match: jax.Array, n_drafts: int) -> jax.Array:
        """Expected accepted drafts [B] of an n-gram proposal of ``n_drafts`` by match length [B]."""
        rates = (self.ngram_hits / self.ngram_tries)[match, :n_drafts]  # [B, n]
        return jnp.sum(jnp.cumprod(rates, axis=1), axis=1)

    def dflash_promise(self, p_top: jax.Array) -> jax.Array:
        """Expected accepted drafts [B] of a DFlash block from its top-1 probabilities [B, n]:
        sum_i prod_(j<=i) p_j, scaled by how well that expectation has held so far."""
        return jnp.sum(jnp.cumprod(p_top, axis=1), axis=1) * self.dflash_acc / self.dflash_pred


@flax.struct.dataclass
class Proposal:
    """One step's proposals, [B, L-1] each, and what judging them needs.

    ngram, match: an n-gram (or any other lookup) proposal and its match length [B];
    dflash, p_top: a DFlash block and the drafter's top-1 probabilities;
    use_ngram [B]: which of the two each row verifies (``hybrid``; None: the one present).
    """

    ngram: jax.Array | None = None
    match: jax.Array | None = None
    dflash: jax.Array | None = None
    p_top: jax.Array | None = None
    use_ngram: jax.Array | None = None

    def drafts(self) -> jax.Array:
        """The drafts each row verifies [B, L-1]."""
        if self.use_ngram is not None:
            return jnp.where(self.use_ngram[:, None], self.ngram, self.dflash)
        return self.dflash if self.ngram is None else self.ngram

    def promise(self, st: ProposalStats) -> jax.Array:
        """Expected accepted drafts [B] of what each row verifies."""
        pn = None if self.ngram is None else st.ngram_promise(self.match, self.ngram.shape[1])
        pd = None if self.dflash is None else st.dflash_promise(self.p_top)
        if pn is None or pd is None:
            return pd if pn is None else pn
        return jnp.where(self.use_ngram, pn, pd)


def accept_length(drafts: jax.Array, targets: jax.Array) -> jax.Array:
    """Accepted drafts per row: the longest prefix with d(i+1) == y_i.

    drafts [B, L-1]; targets [B, L] (the target's own choices y, argmax or sampled).
    """
    return jnp.sum(jnp.cumprod(drafts == targets[:, :-1], axis=1), axis=1).astype(jnp.int32)


def learn(st: ProposalStats, prop: Proposal, y: jax.Array, accepted: jax.Array, active: jax.Array,
          verified: bool) -> ProposalStats:
    """Adds one step's evidence (see ``ProposalStats``).

    y [B, k]: the target's tokens of a k-token pass (k = L, or 1 for a gated step), of which
    accepted + 1 were committed; ``verified``: whether the proposal's drafts were verified
    (False for a gated step).
    """
    n = prop.drafts().shape[1]
    k = y.shape[1]
    ypad = jnp.concatenate([y[:, :n], jnp.full((y.shape[0], max(n - k, 0)), -1, y.dtype)], axis=1)  # [B, n]
    pos = jnp.arange(1, n + 1)[None, :]
    # Draft j can be judged where the target's token at j is known: j <= accepted + 1 (and <= k).
    seen = (pos <= jnp.minimum(accepted + 1, k)[:, None]) & active[:, None]

    def tally(drafts):
        ok = drafts == ypad
        before = jnp.concatenate([jnp.ones_like(ok[:, :1]), jnp.cumprod(ok, axis=1)[:, :-1]], axis=1).astype(bool)
        tries = seen & before
        return tries.astype(jnp.float32), (tries & ok).astype(jnp.float32)

    on = active.astype(jnp.int32)
    st = st.replace(gated=st.gated + (0 if verified else jnp.sum(on)))
    if prop.ngram is not None:
        tries, hits = tally(prop.ngram)
        st = st.replace(ngram_tries=st.ngram_tries.at[prop.match, :n].add(tries),
                        ngram_hits=st.ngram_hits.at[prop.match, :n].add(hits))
    if prop.dflash is not None:
        _, hits = tally(prop.dflash)
        # Calibration counts the same positions on both sides: all L-1 where the DFlash block
        # itself was verified (its accepted count, the hits, is then exact), else those judged.
        own = verified & (active if prop.use_ngram is None else ~prop.use_ngram)
        window = jnp.where(own, n, jnp.minimum(accepted + 1, k))[:, None]
        expect = jnp.where((pos <= window) & active[:, None], jnp.cumprod(prop.p_top, axis=1), 0.0)
        st = st.replace(dflash_acc=st.dflash_acc + jnp.sum(hits), dflash_pred=st.dflash_pred + jnp.sum(expect))
    if prop.use_ngram is not None and verified:
        st = st.replace(chose_ngram=st.chose_ngram + jnp.sum(active & prop.use_ngram),
                        chose_dflash=st.chose_dflash + jnp.sum(active & ~prop.use_ngram))
    return st


@dataclasses.dataclass
class AcceptanceTally:
    """q_k over every decode call (host), for block lengths up to ``longest``.

    A verified step at block length L could accept k drafts for each k < L (a trial of q_k) and
    did when it committed more than k tokens (a success). A step the gate ran as AR verified
    nothing: it counts in the gated share of its length, not in q_k.
    """

    longest: int
    trials: np.ndarray = dataclasses.field(init=False)  # [longest]: verified steps that could accept >= k
    successes: np.ndarray = dataclasses.field(init=False)  # [longest]: verified steps that accepted >= k
    row_steps: dict[int, int] = dataclasses.field(default_factory=dict)  # row-steps run at L
    gated_steps: dict[int, int] = dataclasses.field(default_factory=dict)  # of those, run as AR by the gate

    def __post_init__(self):
        self.trials = np.zeros(self.longest, np.int64)
        self.successes = np.zeros(self.longest, np.int64)

    def observe(self, block: int, hist_delta: np.ndarray, gated: int = 0) -> None:
        """One call's counts: ``hist_delta[i]`` row-steps committed i + 1 tokens, and the gate
        ran ``gated`` of them as AR steps (one token each)."""
        steps = int(hist_delta.sum())
        if block < 2 or steps == 0:
            return
        self.row_steps[block] = self.row_steps.get(block, 0) + steps
        self.gated_steps[block] = self.gated_steps.get(block, 0) + gated
        at_least = np.cumsum(hist_delta[::-1])[::-1]  # [i]: steps that committed > i tokens
        self.trials[1:block] += steps - gated
        self.successes[1:block] += at_least[1:block]

    def q(self) -> np.ndarray:
        """q_k at index k (index 0 unused); unseen k are 0."""
        seen = self.trials > 0
        q = np.zeros(len(self.trials))
        q[seen] = self.successes[seen] / self.trials[seen]
        return q

    def seen(self, block: int) -> np.ndarray:
        """Whether each of q_1 .. q_(block-1) has been observed."""
        return self.trials[1:block] > 0

    def gated_share(self, block: int) -> float:
        """The share of row-steps at ``block`` that the gate ran as AR."""
        return self.gated_steps.get(block, 0) / self.row_steps[block] if self.row_steps.get(block) else 0.0
