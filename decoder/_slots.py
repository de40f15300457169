"""Per-sequence decode state for a static batch of slots, as one explicit pytree."""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.struct
import jax
import jax.numpy as jnp

from dflash_batch.decoder._cache import KVCache
from dflash_batch.decoder._config import TargetConfig

if TYPE_CHECKING:
    from dflash_batch.decoder._speculative import SpecState


@flax.struct.dataclass
class Slots:
    """B slots sharing one preallocated KV cache; a finished slot takes the next request.

    ``last`` is each slot's newest committed token at position ``pos``: it is not in
    the cache yet, and the next target pass runs on it. ``out`` [B, C] holds the
    completion so far (``n_out`` tokens). Lengths are data, never shapes.
    """

    cache: KVCache
    pos: jax.Array  # [B] int32
    last: jax.Array  # [B] int32
    out: jax.Array  # [B, C] int32
    n_out: jax.Array  # [B] int32
    budget: jax.Array  # [B] int32, per-row max_new_tokens
    done: jax.Array  # [B] bool; empty slots are done
    eos: jax.Array  # [B] bool, finished on an EOS token
    temperature: jax.Array  # [B] float32
    top_p: jax.Array  # [B] float32
    key: jax.Array  # [B, 2] uint32
    hist: jax.Array  # [B, L] int32: steps that committed i+1 tokens
    drafted: jax.Array  # [B] int32
    accepted: jax.Array  # [B] int32
    extra: SpecState | None = None  # the speculative modes' state (proposal history, drafter context)

    @classmethod
    def init(cls, cfg: TargetConfig, batch: int, cache_len: int, capacity: int, max_block: int, extra=None) -> "Slots":
        z = lambda dt=jnp.int32: jnp.zeros((batch,), dt)  # noqa: E731
        return cls(
            cache=KVCache.init(cfg, batch, cache_len),
            pos=z(),
            last=z(),
            out=jnp.zeros((batch, capacity), jnp.int32),
            n_out=z(),
            budget=z(),
            done=jnp.ones((batch,), bool),
            eos=z(bool),
            temperature=z(jnp.float32),
            top_p=jnp.ones((batch,), jnp.float32),
            key=jnp.zeros((batch, 2), jnp.uint32),
            hist=jnp.zeros((batch, max_block), jnp.int32),
            drafted=z(),
            accepted=z(),
            extra=extra,
        )

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    @property
    def capacity(self) -> int:
        return self.out.shape[1]


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    """Elementwise: is this token one of the model's end-of-sequence ids."""
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.any(tokens[..., None] == jnp.asarray(eos_ids, jnp.int32), axis=-1)


def start_slot(s: Slots, slot: jax.Array, first: jax.Array, length: jax.Array, budget, temperature, top_p, key,
               eos_ids: tuple[int, ...]) -> Slots:
    """Resets slot ``slot`` for a new request whose prefill produced token ``first``."""
    hit = is_eos(first, eos_ids)
    return s.replace(
        pos=s.pos.at[slot].set(length),
        last=s.last.at[slot].set(first),
        out=s.out.at[slot].set(jnp.zeros((s.capacity,), jnp.int32).at[0].set(first)),
        n_out=s.n_out.at[slot].set(1),
        budget=s.budget.at[slot].set(budget),
        done=s.done.at[slot].set(hit | (budget <= 1)),
        eos=s.eos.at[slot].set(hit),
        temperature=s.temperature.at[slot].set(temperature),
        top_p=s.top_p.at[slot].set(top_p),
        key=s.key.at[slot].set(key),
        hist=s.hist.at[slot].set(0),
        drafted=s.drafted.at[slot].set(0),
        accepted=s.accepted.at[slot].set(0),
    )
