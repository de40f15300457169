"""A test-only proposer: the target's own greedy continuation, i.e. a perfect greedy drafter."""

from __future__ import annotations

import jax.numpy as jnp

from dflash_batch.decoder import forward


def propose_oracle(params, cfg, drafter, s, block):
    """Drafts [B, L-1] by running the target greedily on a scratch copy of the cache."""
    del drafter
    last, cache, drafts = s.last, s.cache, []
    for i in range(block - 1):
        logits, _, cache = forward(params, cfg, last[:, None], s.pos + i, cache)
        last = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        drafts.append(last)
    return jnp.stack(drafts, axis=1)
