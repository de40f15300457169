"""Autoregressive decoding: the lossless reference and the speedup denominator.

Two jitted phases over a ``Slots`` state: ``prefill`` one request into a slot,
and ``decode`` up to ``n_steps`` one-token steps for the whole batch inside a
``lax.while_loop``, so there is no host round-trip per token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dflash_batch.decoder._config import TargetConfig
from dflash_batch.decoder._sampling import sample
from dflash_batch.decoder._slots import Slots, start_slot
from dflash_batch.decoder._step import commit
from dflash_batch.decoder._target import Params, forward


def prefill_chunk(params: Params, cfg: TargetConfig, eos_ids: tuple[int, ...], s: Slots, tokens: jax.Array,
                  start: jax.Array, length: jax.Array, slot: jax.Array, budget: jax.Array, temperature: jax.Array,
                  top_p: jax.Array, key: jax.Array, collect_layers: tuple[int, ...] = ()):
    """Prefills one chunk (tokens [1, P] at positions start..start+P-1) of a prompt of
    ``length`` tokens into cache row ``slot``.

    Prompts are fed in fixed-size chunks, so one compiled function serves every
    prompt length and padding is under one chunk. The chunk holding the prompt's
    last token also samples the first completion token and opens the slot.
    Returns the new state and, when ``collect_layers`` is set, the chunk's hidden
    states after those layers [1, P, n_f, D] (the drafter's context).
    """
    p = tokens.shape[1]
    last_at = jnp.clip(length - 1 - start, 0, p - 1)
    logits, feats, cache = forward(params, cfg, tokens, start[None], s.cache, slot=slot,
                                   logits_at=last_at[None], collect_layers=collect_layers)
    first = sample(logits, temperature[None], top_p[None], key[None], length[None, None])[0, 0]
    opened = start_slot(s, slot, first, length, budget, temperature, top_p, key, eos_ids).replace(cache=None)
    is_last = start + p >= length
    small = jax.tree.map(lambda a, b: jnp.where(is_last, a, b), opened, s.replace(cache=None))
    return small.replace(cache=cache), feats


def ar_step(params: Params, cfg: TargetConfig, eos_ids: tuple[int, ...], s: Slots) -> Slots:
    """One token for every active row: run the target on ``last``, sample, commit."""
    logits, _, cache = forward(params, cfg, s.last[:, None], s.pos, s.cache)
    tok = sample(logits, s.temperature, s.top_p, s.key, (s.pos + 1)[:, None])  # [B, 1]
    return commit(s.replace(cache=cache), tok, jnp.ones_like(s.pos), eos_ids)


def run_steps(step, s: Slots, n_steps: jax.Array, stop_on_first_done: jax.Array) -> tuple[Slots, jax.Array]:
    """Repeats ``step`` until every row is done, ``n_steps`` ran, or (when asked) a row finishes.

    Stopping at the first finished row lets the host refill that slot at once, so
    the batch stays full; otherwise the host is visited every ``n_steps`` steps.
    """
    done0 = s.done

    def cond(c):
        s, i = c
        newly_done = jnp.any(s.done & ~done0)
        return (i < n_steps) & ~jnp.all(s.done) & ~(stop_on_first_done & newly_done)

    def body(c):
        s, i = c
        return step(s), i + 1

    return jax.lax.while_loop(cond, body, (s, jnp.int32(0)))


@functools.partial(jax.jit, static_argnames=("cfg", "eos_ids"), donate_argnames=("s",))
def ar_decode(params: Params, s: Slots, stop_on_first_done: jax.Array, n_steps: jax.Array, *, cfg: TargetConfig,
              eos_ids: tuple[int, ...]) -> tuple[Slots, jax.Array]:
    return run_steps(lambda st: ar_step(params, cfg, eos_ids, st), s, n_steps, stop_on_first_done)


ar_prefill = jax.jit(prefill_chunk, static_argnames=("cfg", "eos_ids", "collect_layers"), donate_argnames=("s",))
