"""One speculative decode step for the whole slot batch, in the DFlash paper's order.

  1. Draft: the proposer answers L-1 drafts per row (``decoder/_proposers.py``).
  2. Verify: one target pass over [anchor, d1..d(L-1)] at each row's own offset.
  3. Accept: the target picks its own token y_i at every block position (argmax, or a sample
     keyed by the position); the longest prefix with d(i+1) == y_i is accepted.
  4. Commit y_0..y_a, the accepted drafts plus one bonus token (so tau counts the bonus),
     and append the committed rows' target features to the drafter's context cache.

With sampling, step 3 is rejection sampling with a one-hot draft: every committed token is
exactly what AR decoding would have sampled at that position, so the output is lossless.
What the step teaches the proposers (``_acceptance.learn``) is bookkeeping beside it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dflash_batch.decoder._acceptance import Proposal, accept_length, learn
from dflash_batch.decoder._config import TargetConfig
from dflash_batch.decoder._drafter import context_kv
from dflash_batch.decoder._drafter_checkpoint import Drafter
from dflash_batch.decoder._proposers import as_proposal
from dflash_batch.decoder._sampling import sample
from dflash_batch.decoder._slots import Slots, is_eos
from dflash_batch.decoder._target import Params, forward, write_rows


def commit(s: Slots, tokens: jax.Array, n_new: jax.Array, eos_ids: tuple[int, ...]) -> Slots:
    """Step 4a: appends each active row's first ``n_new`` of ``tokens`` [B, T] to its completion.

    A row stops at its first EOS or at its budget, whichever comes first, so a block that runs
    past either commits only what AR decoding would have emitted.
    """
    b, t = tokens.shape
    active = ~s.done
    idx = jnp.arange(t)[None, :]  # [1, T]
    room = s.budget - s.n_out  # [B]
    hit = is_eos(tokens, eos_ids) & (idx < n_new[:, None])
    first_eos = jnp.min(jnp.where(hit, idx, t), axis=1)  # [B]
    n = jnp.where(active, jnp.minimum(jnp.minimum(n_new, room), first_eos + 1), 0)  # [B]
    write = jnp.where(idx < n[:, None], s.n_out[:, None] + idx, s.capacity)  # out of range = dropped
    ended_eos = active & (first_eos < n)
    n_out = s.n_out + n
    last = jnp.take_along_axis(tokens, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]  # [B]
    return s.replace(
        pos=s.pos + n, last=jnp.where(active, last, s.last), n_out=n_out,
        out=s.out.at[jnp.arange(b)[:, None], write].set(tokens, mode="drop"),
        done=s.done | ended_eos | (n_out >= s.budget), eos=s.eos | ended_eos,
        hist=s.hist.at[jnp.arange(b), jnp.maximum(n - 1, 0)].add(active.astype(jnp.int32)),
    )


def verify_and_commit(params: Params, cfg: TargetConfig, eos_ids: tuple[int, ...], drafter: Drafter | None,
                      s: Slots, prop: Proposal | None, k: int) -> Slots:
    """Steps 2-4 with a k-token pass over [anchor, first k-1 drafts].

    Without a proposal (a step of an L = 1 call) the drafter's context is not fed; a gated
    step (k = 1 with the proposal it weighed) still feeds it, for the next step may draft.
    """
    ex = s.extra
    offs = jnp.arange(k, dtype=jnp.int32)[None, :]  # [1, k]
    drafts = prop.drafts()[:, : k - 1] if prop is not None else jnp.zeros((s.batch, 0), jnp.int32)  # [B, k-1]
    feeds_drafter = ex.ctx_k is not None and prop is not None
    # 2. Verify.
    verify_in = jnp.concatenate([s.last[:, None], drafts], axis=1)  # [B, k]
    layers = drafter.config.target_layer_ids if feeds_drafter else ()
    logits, feats, cache = forward(params, cfg, verify_in, s.pos, s.cache, collect_layers=layers)
    y = sample(logits, s.temperature, s.top_p, s.key, s.pos[:, None] + 1 + offs)  # [B, k]
    # 3. Accept the longest matching prefix.
    accepted = accept_length(drafts, y)  # [B]
    active = ~s.done
    # 4. Commit it plus the bonus token, and remember the new tokens for n-gram lookup.
    new = commit(s.replace(cache=cache), y, accepted + 1, eos_ids)
    n = new.pos - s.pos  # [B] tokens committed (0 for idle rows)
    positions = s.pos[:, None] + offs  # [B, k]
    tokens = ex.tokens.at[jnp.arange(s.batch)[:, None], positions + 1].set(y, mode="drop")
    ctx_k, ctx_v, ctx_len = ex.ctx_k, ex.ctx_v, ex.ctx_len
    if feeds_drafter:
        # Context K/V depend only on committed tokens, so they never need rollback: all k rows
        # are written after the row's context, and those past the n committed stay dead until
        # overwritten.
        k_new, v_new = context_kv(drafter.params, drafter.config, feats, positions)  # [draft_layers, B, k, K, H]
        at = ctx_len[:, None] + offs  # [B, k]
        ctx_k, ctx_v, ctx_len = write_rows(ctx_k, k_new, at), write_rows(ctx_v, v_new, at), ctx_len + n
    stats = ex.stats if prop is None else learn(ex.stats, prop, y, accepted, active, verified=k > 1)
    return new.replace(
        extra=ex.replace(tokens=tokens, ctx_k=ctx_k, ctx_v=ctx_v, ctx_len=ctx_len, stats=stats),
        drafted=new.drafted + jnp.where(active, k - 1, 0),
        accepted=new.accepted + jnp.maximum(n - 1, 0),
    )


def spec_step(params: Params, cfg: TargetConfig, eos_ids: tuple[int, ...], drafter: Drafter | None, block: int,
              proposer, s: Slots) -> Slots:
    """One speculative step (steps 1-4) for the whole batch; L = 1 is a plain AR step."""
    if block == 1:  # nothing drafts, so the drafter's context is not fed
        return verify_and_commit(params, cfg, eos_ids, drafter, s, None, 1)
    prop = as_proposal(proposer(params, cfg, drafter, s, block), s.batch)  # 1. Draft.
    return verify_and_commit(params, cfg, eos_ids, drafter, s, prop, block)
