"""A test-only proposer: the target's own greedy continuation, i.e. a perfect greedy drafter.

Tests hand it to the decoder (``Decoder(..., proposer=OracleProposer())``) in a mode that needs
no drafter (``ORACLE``); nothing in the product is patched.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dflash_batch.decoder import forward


@dataclasses.dataclass(frozen=True)
class OracleProposer:
    needs_drafter = False

    def __call__(self, params, cfg, drafter, s, block):
        """Drafts [B, L-1] by running the target greedily on a scratch copy of the cache."""
        del drafter
        last, cache, drafts = s.last, s.cache, []
        for i in range(block - 1):
            logits, _, cache = forward(params, cfg, last[:, None], s.pos + i, cache)
            last = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            drafts.append(last)
        return jnp.stack(drafts, axis=1)


propose_oracle = OracleProposer()
ORACLE = dict(mode="ngram", proposer=propose_oracle)  # decoder settings that draft with the oracle
