"""Speculative decoding over the slot batch: the jitted decode and prefill phases.

Each step is ``decoder/_step.py``'s draft -> verify -> accept -> commit; the proposer object
(``decoder/_proposers.py``: DFlash, n-gram, hybrid, or a test's own) is a static argument.

A call at L = 1 (plain AR: the automatic block length chose AR, or a job asked for L = 1)
does not feed the drafter, so it costs what AR costs. The drafter's context is therefore compacted: each
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

from dflash_batch.decoder._acceptance import Proposal, ProposalStats
from dflash_batch.decoder._ar import prefill_chunk, run_steps
from dflash_batch.decoder._config import TargetConfig
from dflash_batch.decoder._drafter_checkpoint import Drafter
from dflash_batch.decoder._drafter_config import DrafterConfig
from dflash_batch.decoder._drafter import context_kv
from dflash_batch.decoder._proposers import as_proposal
from dflash_batch.decoder._slots import Slots
from dflash_batch.decoder._step import spec_step, verify_and_commit
from dflash_batch.decoder._target import Params, write_rows


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


def init_spec_state(batch: int, length: int, dcfg: DrafterConfig | None, max_block: int) -> SpecState:
    tokens = jnp.zeros((batch, length), jnp.int32)
    stats = ProposalStats.init(max_block - 1)
    if dcfg is None:
        return SpecState(tokens=tokens, stats=stats)
    shape = (dcfg.num_layers, batch, dcfg.num_kv_heads, length, dcfg.head_dim)
    return SpecState(tokens=tokens, ctx_k=jnp.zeros(shape, dcfg.dtype), ctx_v=jnp.zeros(shape, dcfg.dtype),
                     stats=stats, ctx_len=jnp.zeros((batch,), jnp.int32))


def run_gated_steps(params: Params, cfg: TargetConfig, eos_ids: tuple[int, ...], drafter: Drafter | None,
                    block: int, proposer, s: Slots, n_steps: jax.Array, stop_on_first_done: jax.Array,
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
        return as_proposal(proposer(params, cfg, drafter, st, block), st.batch)

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
            st = verify_and_commit(params, cfg, eos_ids, drafter, st, prop, k)
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


_STATIC = ("cfg", "eos_ids", "proposer")


@functools.partial(jax.jit, static_argnames=_STATIC + ("block", "gated"), donate_argnames=("s",))
def spec_decode(params: Params, drafter: Drafter | None, s: Slots, stop_on_first_done: jax.Array,
                n_steps: jax.Array, gate: jax.Array, *, cfg: TargetConfig, eos_ids: tuple[int, ...], block: int,
                proposer, gated: bool = False) -> tuple[Slots, jax.Array]:
    """Up to ``n_steps`` speculative steps at block length ``block``; with ``gated``, each step
    runs as an AR step unless its proposals promise to pay for the pass (``gate``: the
    pass's cost in AR steps, data, so a new cost estimate compiles nothing)."""
    if gated and block > 1:
        return run_gated_steps(params, cfg, eos_ids, drafter, block, proposer, s, n_steps, stop_on_first_done, gate)
    return run_steps(lambda st: spec_step(params, cfg, eos_ids, drafter, block, proposer, st), s, n_steps,
                     stop_on_first_done)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("s",))
def spec_prefill(params: Params, drafter: Drafter | None, s: Slots, tokens, start, length, slot, budget,
                 temperature, top_p, key, *, cfg: TargetConfig, eos_ids: tuple[int, ...], proposer) -> Slots:
    del proposer  # static: one compiled prefill per proposer
    return spec_prefill_chunk(params, cfg, eos_ids, drafter, s, tokens, start, length, slot, budget,
                              temperature, top_p, key)
