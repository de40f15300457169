"""Speculative decoding over the slot batch: DFlash block drafts or n-gram lookups, verified losslessly.

One decode step, for every active row at once (the DFlash paper's loop):
  1. Draft L-1 tokens: one drafter pass over [anchor, MASK x (L-1)] (``dflash``), or
     the tokens that followed the latest earlier match of the row's last few tokens
     (``ngram``, prompt lookup), or per row whichever of the two promises more
     accepted tokens (``hybrid``, see ``propose_hybrid``).
  2. Verify: one target pass over [anchor, d1..d(L-1)] at the row's own offset.
  3. The target picks its own token y_i at every block position (argmax, or a sample
     keyed by the position). Accept the longest prefix with d(i+1) == y_i and commit
     y_0..y_a: the accepted drafts plus one bonus token, so tau counts the bonus.
     With sampling this is rejection sampling with a one-hot draft: every committed
     token is exactly what AR decoding would have sampled at that position.
  4. Append the committed rows' target features to the drafter's context cache.
     Context K/V depend only on committed tokens, so they never need rollback.

A call at L = 1 (plain AR: the automatic block length chose AR, or a job asked for L = 1)
skips step 4, so it costs what AR costs. The drafter's context is therefore compacted: each
row keeps its own context length (``SpecState.ctx_len``), rows are stored one after another
with RoPE already applied at each token's true position, and tokens committed by an AR call
are simply absent. Draft attention is non-causal and its keys carry their positions, so
storage order is immaterial. The drafter only proposes, so a gap changes acceptance, never output.

With a gate (the automatic block length; ``run_gated_steps``), each step first weighs its proposals: every row
promises an expected number of accepted drafts (from the n-gram match length, or from the
drafter's own confidence, each calibrated by what was accepted so far), and the step
verifies the L-token block only if the batch's promised tokens outgrow what the L-token
pass costs relative to a 1-token pass; otherwise it runs a plain AR step (a 1-token pass
on the anchor). Either way it commits the target's own tokens, so the gate changes only
the speed. The steps a gate turned into AR steps are counted (``ProposalStats.gated``).
"""

from __future__ import annotations

import functools
import flax.struct
import jax
import jax.numpy as jnp

from dflash_batch.decoder._ar import prefill_chunk, run_steps
from dflash_batch.decoder._config import TargetConfig
from dflash_batch.decoder._drafter_checkpoint import Drafter
from dflash_batch.decoder._drafter_config import DrafterConfig
from dflash_batch.decoder._drafter import context_kv, draft_block, draft_to_target_ids
from dflash_batch.decoder._sampling import sample
from dflash_batch.decoder._slots import Slots, commit
from dflash_batch.decoder._target import Params, forward, write_rows

NGRAM_MAX = 3  # longest suffix the n-gram proposer tries to match


@flax.struct.dataclass
class SpecState:
    """Per-slot state the proposers need beyond the target's.

    tokens [B, S]: the token at each position (prompt, then completion), for n-gram lookup.
    ctx_k, ctx_v [draft_layers, B, K, S, H]: the drafter's context K/V (None without a drafter), stored
    compacted: rows below ``ctx_len`` [B] are valid, each with RoPE at its token's own position
    (``ctx_len`` <= ``pos``: tokens committed by L = 1 calls have no row; see the module docstring).
    """

    tokens: jax.Array
    ctx_k: jax.Array | None = None
    ctx_v: jax.Array | None = None
    stats: ProposalStats | None = None
    ctx_len: jax.Array | None = None


@flax.struct.dataclass
class ProposalStats:
    """What the decoder has learnt about its proposals, over the whole batch.

    Acceptance is kept per draft position as conditional rates (a Kaplan-Meier table):
    a try at position j is a step where drafts 1..j-1 were accepted and the target's
    token at j is known; a hit is a try whose draft j matched it too. P(at least k
    drafts accepted) is the product of the rates up to k. Steps that verified another
    proposal, or none (gated), still tell how far this one would have been accepted, up
    to what was committed, so every proposal learns from every step.

    ngram_hits, ngram_tries [NGRAM_MAX + 1, D]: n-gram proposals by match length (0: no
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


def init_spec_state(batch: int, length: int, dcfg: DrafterConfig | None, max_block: int) -> SpecState:
    tokens = jnp.zeros((batch, length), jnp.int32)
    stats = ProposalStats.init(max_block - 1)
    if dcfg is None:
        return SpecState(tokens=tokens, stats=stats)
    shape = (dcfg.num_layers, batch, dcfg.num_kv_heads, length, dcfg.head_dim)
    return SpecState(tokens=tokens, ctx_k=jnp.zeros(shape, dcfg.dtype), ctx_v=jnp.zeros(shape, dcfg.dtype),
                     stats=stats, ctx_len=jnp.zeros((batch,), jnp.int32))


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


def _dflash_logits(params: Params, cfg: TargetConfig, drafter: Drafter, s: Slots, block: int) -> jax.Array:
    """Draft-vocabulary logits [B, L-1] of ONE drafter pass over [anchor, MASK x (L-1)]."""
    ex: SpecState = s.extra
    masks = jnp.full((s.batch, block - 1), drafter.config.mask_token_id, jnp.int32)
    block_in = jnp.concatenate([s.last[:, None], masks], axis=1)  # [B, L]
    # The anchor at ``pos`` has not been through the target yet: the context holds tokens < pos.
    return draft_block(drafter.params, drafter.config, params, cfg, block_in, s.pos, ex.ctx_k, ex.ctx_v, ex.ctx_len)


def _greedy_drafts(drafter: Drafter, dlogits: jax.Array) -> jax.Array:
    """The drafter's top-1 tokens [B, L-1], as target ids."""
    return draft_to_target_ids(drafter.params, jnp.argmax(dlogits, axis=-1)).astype(jnp.int32)


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


def propose_dflash(params: Params, cfg: TargetConfig, drafter: Drafter, s: Slots, block: int) -> Proposal:
    """L-1 drafts per row from ONE drafter pass over [anchor, MASK x (L-1)], greedy."""
    dlogits = _dflash_logits(params, cfg, drafter, s, block)
    return Proposal(dflash=_greedy_drafts(drafter, dlogits), p_top=jnp.max(jax.nn.softmax(dlogits, axis=-1), axis=-1))


def propose_ngram(params: Params, cfg: TargetConfig, drafter, s: Slots, block: int) -> Proposal:
    del params, cfg, drafter
    drafts, match = ngram_match(s.extra.tokens, s.pos, block - 1)
    return Proposal(ngram=drafts, match=match)


def propose_hybrid(params: Params, cfg: TargetConfig, drafter: Drafter, s: Slots, block: int) -> Proposal:
    """Both proposals, and per row the one that promises more accepted drafts.

    DFlash promises sum_i prod_(j<=i) p_j from its own top-1 probabilities, calibrated by
    how well that promise has held so far; an n-gram proposal promises what was accepted
    at each position so far after a match of its length. Both learn from every step
    (see ``ProposalStats``).
    """
    st: ProposalStats = s.extra.stats
    ngram, match = ngram_match(s.extra.tokens, s.pos, block - 1)
    both = propose_dflash(params, cfg, drafter, s, block).replace(ngram=ngram, match=match)
    promise_n = st.ngram_promise(match, block - 1)
    return both.replace(use_ngram=(both.match > 0) & (promise_n > st.dflash_promise(both.p_top)))


def _as_proposal(drafts, batch: int) -> Proposal:
    """A proposer's answer as a Proposal: a bare [B, L-1] array is judged like an n-gram
    proposal without a match (by the acceptance seen so far, table row 0)."""
    if isinstance(drafts, Proposal):
        return drafts
    return Proposal(ngram=drafts, match=jnp.zeros((batch,), jnp.int32))


def _learn(st: ProposalStats, prop: Proposal, y: jax.Array, accepted: jax.Array, active: jax.Array,
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


def accept_length(drafts: jax.Array, targets: jax.Array) -> jax.Array:
    """Accepted drafts per row: the longest prefix with d(i+1) == y_i.

    drafts [B, L-1]; targets [B, L] (the target's own choices y, argmax or sampled).
    """
    return jnp.sum(jnp.cumprod(drafts == targets[:, :-1], axis=1), axis=1).astype(jnp.int32)


# Proposal sources by decode mode. Each maps (params, cfg, drafter, state, L) to a Proposal
# (or to bare drafts [B, L-1]).
PROPOSERS = {"dflash": propose_dflash, "ngram": propose_ngram, "hybrid": propose_hybrid}


def _verify(params: Params, cfg: TargetConfig, eos_ids: tuple[int, ...], drafter: Drafter | None, s: Slots,
            prop: Proposal | None, k: int) -> Slots:
    """Steps 2-4 of the module docstring with a k-token pass over [anchor, first k-1 drafts].

    Without a proposal (a step of an L = 1 call) step 4 is skipped; a gated step (k = 1 with
    the proposal it weighed) still feeds the drafter's context, for the next step may draft."""
    ex: SpecState = s.extra
    rows = jnp.arange(s.batch)[:, None]  # [B, 1]
    offs = jnp.arange(k, dtype=jnp.int32)[None, :]  # [1, k]
    drafts = prop.drafts()[:, : k - 1] if prop is not None else jnp.zeros((s.batch, 0), jnp.int32)
    uses_drafter = ex.ctx_k is not None and prop is not None
    layers = drafter.config.target_layer_ids if uses_drafter else ()
    # 2. Verify.
    verify_in = jnp.concatenate([s.last[:, None], drafts], axis=1)  # [B, k]
    logits, feats, cache = forward(params, cfg, verify_in, s.pos, s.cache, collect_layers=layers)
    y = sample(logits, s.temperature, s.top_p, s.key, s.pos[:, None] + 1 + offs)  # [B, k]
    # 3. Accept the longest matching prefix, plus the bonus token.
    accepted = accept_length(drafts, y)  # [B]
    active = ~s.done
    new = commit(s.replace(cache=cache), y, accepted + 1, eos_ids)
    n = new.pos - s.pos  # tokens committed per row (0 for idle rows)
    # 4. Remember the new tokens and extend the drafter's context with their features.
    positions = s.pos[:, None] + offs  # [B, k]
    tokens = ex.tokens.at[rows, positions + 1].set(y, mode="drop")
    ctx_k, ctx_v, ctx_len = ex.ctx_k, ex.ctx_v, ex.ctx_len
    if uses_drafter:
        # All k rows are written, after the row's context; those past the n committed are
        # dead until overwritten.
        k_new, v_new = context_kv(drafter.params, drafter.config, feats, positions)  # [draft_layers, B, k, K, H]
        at = ctx_len[:, None] + offs
        ctx_k, ctx_v, ctx_len = write_rows(ctx_k, k_new, at), write_rows(ctx_v, v_new, at), ctx_len + n
    stats = ex.stats if prop is None else _learn(ex.stats, prop, y, accepted, active, verified=k > 1)
    return new.replace(
        extra=ex.replace(tokens=tokens, ctx_k=ctx_k, ctx_v=ctx_v, ctx_len=ctx_len, stats=stats),
        drafted=new.drafted + jnp.where(active, k - 1, 0),
        accepted=new.accepted + jnp.maximum(n - 1, 0),
    )


def spec_step(params: Params, cfg: TargetConfig, eos_ids: tuple[int, ...], drafter: Drafter | None, block: int,
              mode: str, s: Slots) -> Slots:
    """One speculative step (steps 1-4 of the module docstring) for the whole batch."""
    if block == 1:  # plain AR: nothing drafts, so the drafter's context is not fed
        return _verify(params, cfg, eos_ids, drafter, s, None, 1)
    prop = _as_proposal(PROPOSERS[mode](params, cfg, drafter, s, block), s.batch)  # 1. Draft.
    return _verify(params, cfg, eos_ids, drafter, s, prop, block)


def run_gated_steps(params: Params, cfg: TargetConfig, eos_ids: tuple[int, ...], drafter: Drafter | None,
                    block: int, mode: str, s: Slots, n_steps: jax.Array, stop_on_first_done: jax.Array,
                    gate: jax.Array) -> tuple[Slots, jax.Array]:
    """``run_steps`` of speculative steps, each verified only where the batch's proposals
    promise more tokens per second than an AR step (``gate``: the L-token pass's cost
    relative to a 1-token pass), else run as an AR step.

    The choice is made by two inner loops that alternate (verify while it pays, AR while it
    does not) rather than a ``lax.cond`` per step: a conditional's operands (the KV caches)
    are copied on every step on a CPU, which costs more than the gate saves. Each step's
    proposal is made once, at the end of the step before, and carried.
    """
    done0 = s.done

    def propose(st: Slots) -> Proposal:
        return _as_proposal(PROPOSERS[mode](params, cfg, drafter, st, block), st.batch)

    def pays(st: Slots, prop: Proposal) -> jax.Array:
        active = ~st.done
        return jnp.sum(jnp.where(active, 1.0 + prop.promise(st.extra.stats), 0.0)) > gate * jnp.sum(active)

    def running(st: Slots, i: jax.Array) -> jax.Array:
        newly_done = jnp.any(st.done & ~done0)
        return (i < n_steps) & ~jnp.all(st.done) & ~(stop_on_first_done & newly_done)

    def steps_while(k: int, verify: bool):
        def cond(c):
            st, prop, i = c
            return running(st, i) & (pays(st, prop) == verify)

        def body(c):
            st, prop, i = c
            st = _verify(params, cfg, eos_ids, drafter, st, prop, k)
            return st, propose(st), i + 1

        return lambda c: jax.lax.while_loop(cond, body, c)

    verifying, plain = steps_while(block, True), steps_while(1, False)
    s, _, ran = jax.lax.while_loop(lambda c: running(c[0], c[2]), lambda c: plain(verifying(c)),
                                   (s, propose(s), jnp.int32(0)))
    return s, ran


def spec_prefill_chunk(params: Params, cfg: TargetConfig, eos_ids: tuple[int, ...], drafter: Drafter | None,
                       s: Slots, tokens: jax.Array, start: jax.Array, length: jax.Array, slot: jax.Array,
                       budget: jax.Array, temperature: jax.Array, top_p: jax.Array, key: jax.Array) -> Slots:
    """``prefill_chunk``, plus the prompt's tokens and (DFlash) its context K/V for the slot."""
    ex: SpecState = s.extra
    layers = drafter.config.target_layer_ids if drafter is not None else ()
    s, feats = prefill_chunk(params, cfg, eos_ids, s.replace(extra=None), tokens, start, length, slot, budget,
                             temperature, top_p, key, collect_layers=layers)
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)  # [P]
    hist = ex.tokens.at[slot, positions].set(tokens[0], mode="drop")
    hist = jnp.where(start + tokens.shape[1] >= length, hist.at[slot, length].set(s.last[slot]), hist)
    ctx_k, ctx_v, ctx_len = ex.ctx_k, ex.ctx_v, ex.ctx_len
    if drafter is not None:
        # A prompt has no gaps: its context rows sit at their positions.
        k_new, v_new = context_kv(drafter.params, drafter.config, feats, positions[None])  # [draft_layers, 1, P, K, H]
        ctx_k = write_rows(ctx_k, k_new, positions[None], slot)
        ctx_v = write_rows(ctx_v, v_new, positions[None], slot)
        ctx_len = ctx_len.at[slot].set(jnp.minimum(start + tokens.shape[1], length))
    return s.replace(extra=ex.replace(tokens=hist, ctx_k=ctx_k, ctx_v=ctx_v, ctx_len=ctx_len))


_STATIC = ("cfg", "eos_ids", "mode")


@functools.partial(jax.jit, static_argnames=_STATIC + ("block", "gated"), donate_argnames=("s",))
def spec_decode(params: Params, drafter: Drafter | None, s: Slots, stop_on_first_done: jax.Array,
                n_steps: jax.Array, gate: jax.Array, *, cfg: TargetConfig, eos_ids: tuple[int, ...], block: int,
                mode: str, gated: bool = False) -> tuple[Slots, jax.Array]:
    """Up to ``n_steps`` speculative steps at block length ``block``; with ``gated``, each step
    runs as an AR step unless its proposals promise to pay for the pass (``gate``: the
    pass's cost in AR steps, data, so a new cost estimate compiles nothing)."""
    if gated and block > 1:
        return run_gated_steps(params, cfg, eos_ids, drafter, block, mode, s, n_steps, stop_on_first_done, gate)
    return run_steps(lambda st: spec_step(params, cfg, eos_ids, drafter, block, mode, st), s, n_steps,
                     stop_on_first_done)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("s",))
def spec_prefill(params: Params, drafter: Drafter | None, s: Slots, tokens, start, length, slot, budget,
                 temperature, top_p, key, *, cfg: TargetConfig, eos_ids: tuple[int, ...], mode: str) -> Slots:
    del mode  # static: one compiled prefill per mode
    return spec_prefill_chunk(params, cfg, eos_ids, drafter, s, tokens, start, length, slot, budget,
                              temperature, top_p, key)
