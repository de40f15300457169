"""Choosing the target's token at each position: greedy, or temperature / top-p sampling.

Each row samples with its own key, folded with the absolute position of the token
being chosen. A row's output therefore depends only on its prompt and seed, never
on which rows share its batch or on how many tokens a decode step commits; that
is what lets speculative decoding reproduce AR sampling seed for seed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dflash_batch.decoder._mesh import unshard_vocab


def row_key(seed: int) -> np.ndarray:
    """Raw uint32[2] threefry key data for a row's seed (host side, once per request).

    All 64 bits count and negative seeds are fine: the seed is read as two's-complement
    uint64 and split into its high and low words, as a 64-bit threefry seed is.
    """
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return np.array([s >> 32, s & 0xFFFFFFFF], np.uint32)


def nucleus_filter(scaled: jax.Array, top_p: jax.Array) -> jax.Array:
    """Masks logits [B, T, V] outside each row's top-p nucleus (top_p [B]) with -inf.

    The nucleus is the smallest set of highest-probability tokens whose mass reaches
    top_p; the most likely token is always kept.
    """
    sorted_desc = -jnp.sort(-scaled, axis=-1)  # [B, T, V]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p[:, None, None]
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)  # [B, T, 1]
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample(
    logits: jax.Array, temperature: jax.Array, top_p: jax.Array, keys: jax.Array, positions: jax.Array
) -> jax.Array:
    """Picks one token per position.

    logits [B, T, V] (fp32); temperature, top_p [B]; keys uint32 [B, 2];
    positions [B, T]: the absolute position each chosen token will occupy.
    A row with temperature 0 is greedy. Returns int32 [B, T].
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def stochastic() -> jax.Array:
        temp = jnp.where(temperature > 0, temperature, 1.0)[:, None, None]
        scaled = unshard_vocab(logits) / temp  # on a mesh: sorting along V needs whole rows
        scaled = jax.lax.cond(jnp.any(top_p < 1.0), nucleus_filter, lambda s, _: s, scaled, top_p)
        fold = jax.vmap(jax.vmap(jax.random.fold_in, in_axes=(None, 0)), in_axes=(0, 0))
        pos_keys = fold(jax.random.wrap_key_data(keys), positions.astype(jnp.uint32))  # [B, T]
        gumbel = jax.vmap(jax.vmap(lambda k: jax.random.gumbel(k, (logits.shape[-1],))))(pos_keys)
        return jnp.argmax(scaled + gumbel, axis=-1).astype(jnp.int32)

    sampled = jax.lax.cond(jnp.any(temperature > 0), stochastic, lambda: greedy)
    return jnp.where(temperature[:, None] > 0, sampled, greedy)
