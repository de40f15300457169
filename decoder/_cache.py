"""The target's KV cache: preallocated once per (batch, length) bucket, written in place."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from dflash_batch.decoder._config import TargetConfig


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, [layers, B, K, S, H] each.

    Heads lead the sequence axis so attention contracts each (batch, kv head) pair's
    [S, H] slab as is, with no per-layer transpose of the cache. Row s of a sequence
    holds the token at absolute position s. Rows past a
    sequence's committed length are dead: they are overwritten before any query
    can see them, because a query at position p attends only to rows <= p.
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def init(cls, cfg: TargetConfig, batch: int, length: int) -> "KVCache":
        """Zeros in the model's dtype (``cfg.dtype``): the cache holds what the layers computed, unrounded."""
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
        return cls(k=jnp.zeros(shape, cfg.dtype), v=jnp.zeros(shape, cfg.dtype))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def length(self) -> int:
        return self.k.shape[3]
