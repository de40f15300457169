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
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from dflash_batch.decoder._ar import prefill_chunk, run_steps
from dflash_batch.decoder._config import TargetConfig
from dflash_batch.decoder._drafter import DrafterConfig, context_kv, draft_block, draft_to_target_ids
from dflash_batch.decoder._sampling import sample
from dflash_batch.decoder._slots import Slots, commit
from dflash_batch.decoder._target import Params, forward, write_rows

NGRAM_MAX = 3  # longest suffix the n-gram proposer tries to match


@flax.struct.dataclass
class SpecState:
    """Per-slot state the proposers need beyond the target's.

    tokens [B, S]: the token at each position (prompt, then completion), for n-gram lookup.
    ctx_k, ctx_v [Ld, B, K, S, H]: the drafter's context K/V (None without a drafter);
    rows below a slot's ``pos`` are valid.
    """

    tokens: jax.Array
    ctx_k: Any = None
    ctx_v: Any = None
    hybrid: Any = None  # HybridStats in mode ``hybrid``


@flax.struct.dataclass
class HybridStats:
    """What the ``hybrid`` chooser has learnt about its two sources, over the whole batch.

    ngram_acc, ngram_n [NGRAM_MAX + 1]: accepted drafts and steps of n-gram proposals by
      match length (index 0, no match, is never chosen);
    dflash_acc, dflash_pred: accepted DFlash drafts, and the drafter's own expectation of
      them, summed: their ratio calibrates the drafter's confidence;
    chose_ngram, chose_dflash: steps that verified each source.
    """

    ngram_acc: jax.Array
    ngram_n: jax.Array
    dflash_acc: jax.Array
    dflash_pred: jax.Array
    chose_ngram: jax.Array
    chose_dflash: jax.Array

    @classmethod
    def init(cls) -> "HybridStats":
        # One optimistic pseudo-observation per source, so each gets tried before data decide.
        prior = jnp.arange(NGRAM_MAX + 1, dtype=jnp.float32)
        return cls(ngram_acc=prior, ngram_n=jnp.ones((NGRAM_MAX + 1,), jnp.float32),
                   dflash_acc=jnp.float32(1), dflash_pred=jnp.float32(1),
                   chose_ngram=jnp.int32(0), chose_dflash=jnp.int32(0))


def init_spec_state(batch: int, length: int, dcfg: DrafterConfig | None, mode: str = "dflash") -> SpecState:
    tokens = jnp.zeros((batch, length), jnp.int32)
    if dcfg is None:
        return SpecState(tokens=tokens)
    shape = (dcfg.num_layers, batch, dcfg.num_kv_heads, length, dcfg.head_dim)
    return SpecState(tokens=tokens, ctx_k=jnp.zeros(shape, jnp.float32), ctx_v=jnp.zeros(shape, jnp.float32),
                     hybrid=HybridStats.init() if mode == "hybrid" else None)


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


def ngram_propose(tokens: jax.Array, pos: jax.Array, n_draft: int) -> jax.Array:
    return ngram_match(tokens, pos, n_draft)[0]


def _dflash_logits(params: Params, cfg: TargetConfig, drafter, s: Slots, block: int) -> jax.Array:
    """Draft-vocabulary logits [B, L-1] of ONE drafter pass over [anchor, MASK x (L-1)]."""
    dparams, dcfg = drafter
    ex: SpecState = s.extra
    masks = jnp.full((s.batch, block - 1), dcfg.mask_token_id, jnp.int32)
    block_in = jnp.concatenate([s.last[:, None], masks], axis=1)  # [B, L]
    # The anchor at ``pos`` has not been through the target yet: context is rows < pos.
    return draft_block(dparams, dcfg, params, cfg, block_in, s.pos, ex.ctx_k, ex.ctx_v, s.pos)


def _greedy_drafts(drafter, dlogits: jax.Array) -> jax.Array:
    """The drafter's top-1 tokens [B, L-1], as target ids."""
    return draft_to_target_ids(drafter[0], jnp.argmax(dlogits, axis=-1)).astype(jnp.int32)


def propose_dflash(params: Params, cfg: TargetConfig, drafter, s: Slots, block: int) -> jax.Array:
    """L-1 drafts per row from ONE drafter pass over [anchor, MASK x (L-1)], greedy."""
    return _greedy_drafts(drafter, _dflash_logits(params, cfg, drafter, s, block))


def propose_ngram(params: Params, cfg: TargetConfig, drafter, s: Slots, block: int) -> jax.Array:
    del params, cfg, drafter
    return ngram_propose(s.extra.tokens, s.pos, block - 1)


@flax.struct.dataclass
class HybridChoice:
    """One hybrid step's two proposals [B, L-1], the match length [B], the drafter's own
    expected accepted count [B], and which rows verify the n-gram proposal [B]."""

    ngram: jax.Array
    dflash: jax.Array
    match: jax.Array
    dflash_expect: jax.Array
    use_ngram: jax.Array


def propose_hybrid(params: Params, cfg: TargetConfig, drafter, s: Slots, block: int) -> HybridChoice:
    """Both proposals, and per row the one that promises more accepted drafts.

    DFlash promises sum_i prod_(j<=i) p_j, from its own top-1 probabilities p_j, scaled by
    how well that promise has held so far (accepted / promised). An n-gram proposal
    promises the mean acceptance seen so far for its match length. Both estimates learn
    from every step, since the committed tokens tell how far either proposal would have
    been accepted (up to the committed length).
    """
    st: HybridStats = s.extra.hybrid
    dlogits = _dflash_logits(params, cfg, drafter, s, block)
    p_top = jnp.max(jax.nn.softmax(dlogits, axis=-1), axis=-1)  # [B, L-1]
    expect = jnp.sum(jnp.cumprod(p_top, axis=1), axis=1)  # [B]
    d_drafts = _greedy_drafts(drafter, dlogits)
    n_drafts, match = ngram_match(s.extra.tokens, s.pos, block - 1)
    promise_d = expect * st.dflash_acc / st.dflash_pred
    promise_n = (st.ngram_acc / st.ngram_n)[match]
    use_ngram = (match > 0) & (promise_n > promise_d)
    return HybridChoice(ngram=n_drafts, dflash=d_drafts, match=match, dflash_expect=expect, use_ngram=use_ngram)


def _learn(st: HybridStats, c: HybridChoice, y: jax.Array, accepted: jax.Array, active: jax.Array) -> HybridStats:
    """Adds one step's evidence: each proposal's accepted length against the committed
    tokens y[:, :accepted+1] (exact for the verified proposal; for the other, censored at
    what was committed)."""
    committed = jnp.arange(y.shape[1] - 1)[None, :] <= accepted[:, None]  # [B, L-1]

    def accepts(drafts):
        return jnp.sum(jnp.cumprod((drafts == y[:, :-1]) & committed, axis=1), axis=1).astype(jnp.float32)

    a_n, a_d, on = accepts(c.ngram), accepts(c.dflash), active.astype(jnp.float32)
    has_match = on * (c.match > 0)
    return st.replace(
        ngram_acc=st.ngram_acc.at[c.match].add(a_n * has_match),
        ngram_n=st.ngram_n.at[c.match].add(has_match),
        dflash_acc=st.dflash_acc + jnp.sum(a_d * on),
        dflash_pred=st.dflash_pred + jnp.sum(c.dflash_expect * on),
        chose_ngram=st.chose_ngram + jnp.sum(active & c.use_ngram),
        chose_dflash=st.chose_dflash + jnp.sum(active & ~c.use_ngram),
    )


def accept_length(drafts: jax.Array, targets: jax.Array, logits: jax.Array) -> jax.Array:
    """Accepted drafts per row: the longest prefix with d(i+1) == y_i.

    drafts [B, L-1]; targets [B, L] (the target's own choices y); logits unused by
    this exact rule, passed so a test can substitute a wrong rule and watch the
    distribution test catch it.
    """
    del logits
    return jnp.sum(jnp.cumprod(drafts == targets[:, :-1], axis=1), axis=1).astype(jnp.int32)


# Proposal sources by decode mode. Each maps (params, cfg, drafter, state, L) to drafts [B, L-1]
# (``hybrid``: to a HybridChoice, whose chosen rows are verified).
PROPOSERS = {"dflash": propose_dflash, "ngram": propose_ngram, "hybrid": propose_hybrid}


def spec_step(params: Params, cfg: TargetConfig, eos_ids: tuple[int, ...], drafter, block: int, mode: str,
              s: Slots) -> Slots:
    """One speculative step (steps 1-4 of the module docstring) for the whole batch."""
    ex: SpecState = s.extra
    rows = jnp.arange(s.batch)[:, None]  # [B, 1]
    offs = jnp.arange(block, dtype=jnp.int32)[None, :]  # [1, L]
    # 1. Draft (a block of 1 is plain AR that still feeds the drafter's context).
    choice = None
    if block > 1:
        drafts = PROPOSERS[mode](params, cfg, drafter, s, block)  # [B, L-1]
        if isinstance(drafts, HybridChoice):
            choice = drafts
            drafts = jnp.where(choice.use_ngram[:, None], choice.ngram, choice.dflash)
    else:
        drafts = jnp.zeros((s.batch, 0), jnp.int32)
    uses_drafter = ex.ctx_k is not None
    layers = drafter[1].target_layer_ids if uses_drafter else ()
    # 2. Verify.
    verify_in = jnp.concatenate([s.last[:, None], drafts], axis=1)  # [B, L]
    logits, feats, cache = forward(params, cfg, verify_in, s.pos, s.cache, collect_layers=layers)
    y = sample(logits, s.temperature, s.top_p, s.key, s.pos[:, None] + 1 + offs)  # [B, L]
    # 3. Accept the longest matching prefix, plus the bonus token.
    accepted = accept_length(drafts, y, logits)  # [B]
    active = ~s.done
    new = commit(s.replace(cache=cache), y, accepted + 1, eos_ids)
    n = new.pos - s.pos  # tokens committed per row (0 for idle rows)
    # 4. Remember the new tokens and extend the drafter's context with their features.
    positions = s.pos[:, None] + offs  # [B, L]
    tokens = ex.tokens.at[rows, positions + 1].set(y, mode="drop")
    ctx_k, ctx_v = ex.ctx_k, ex.ctx_v
    if uses_drafter:
        # All L rows are written; those past the new ``pos`` are dead until overwritten.
        k_new, v_new = context_kv(drafter[0], drafter[1], feats, positions)  # [Ld, B, L, K, H]
        ctx_k, ctx_v = write_rows(ctx_k, k_new, positions), write_rows(ctx_v, v_new, positions)
    hybrid = ex.hybrid if choice is None else _learn(ex.hybrid, choice, y, accepted, active)
    return new.replace(
        extra=ex.replace(tokens=tokens, ctx_k=ctx_k, ctx_v=ctx_v, hybrid=hybrid),
        drafted=new.drafted + jnp.where(active, block - 1, 0),
        accepted=new.accepted + jnp.maximum(n - 1, 0),
    )


def spec_prefill_chunk(params: Params, cfg: TargetConfig, eos_ids: tuple[int, ...], drafter, mode: str, s: Slots,
                       tokens: jax.Array, start: jax.Array, length: jax.Array, slot: jax.Array, budget: jax.Array,
                       temperature: jax.Array, top_p: jax.Array, key: jax.Array) -> Slots:
    """``prefill_chunk``, plus the prompt's tokens and (DFlash) its context K/V for the slot."""
    ex: SpecState = s.extra
    layers = drafter[1].target_layer_ids if ex.ctx_k is not None else ()
    s, feats = prefill_chunk(params, cfg, eos_ids, s.replace(extra=None), tokens, start, length, slot, budget,
                             temperature, top_p, key, collect_layers=layers)
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)  # [P]
    hist = ex.tokens.at[slot, positions].set(tokens[0], mode="drop")
    hist = jnp.where(start + tokens.shape[1] >= length, hist.at[slot, length].set(s.last[slot]), hist)
    ctx_k, ctx_v = ex.ctx_k, ex.ctx_v
    if ex.ctx_k is not None:
        k_new, v_new = context_kv(drafter[0], drafter[1], feats, positions[None])  # [Ld, 1, P, K, H]
        ctx_k = write_rows(ctx_k, k_new, positions[None], slot)
        ctx_v = write_rows(ctx_v, v_new, positions[None], slot)
    return s.replace(extra=ex.replace(tokens=hist, ctx_k=ctx_k, ctx_v=ctx_v))


_STATIC = ("cfg", "eos_ids", "dcfg", "mode")


@functools.partial(jax.jit, static_argnames=_STATIC + ("block",), donate_argnames=("s",))
def spec_decode(params: Params, dparams, s: Slots, stop_on_first_done: jax.Array, n_steps: jax.Array, *,
                cfg: TargetConfig, eos_ids: tuple[int, ...], dcfg: DrafterConfig | None, block: int,
                mode: str) -> tuple[Slots, jax.Array]:
    drafter = (dparams, dcfg)
    return run_steps(lambda st: spec_step(params, cfg, eos_ids, drafter, block, mode, st), s, n_steps,
                     stop_on_first_done)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("s",))
def spec_prefill(params: Params, dparams, s: Slots, tokens, start, length, slot, budget, temperature, top_p, key, *,
                 cfg: TargetConfig, eos_ids: tuple[int, ...], dcfg: DrafterConfig | None, mode: str) -> Slots:
    return spec_prefill_chunk(params, cfg, eos_ids, (dparams, dcfg), mode, s, tokens, start, length, slot, budget,
                              temperature, top_p, key)
