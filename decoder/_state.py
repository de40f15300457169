"""The slot state a decoder allocates for a bucket, built in one place for the decoder and the plan.

``Decoder`` allocates its state through ``new_state``, and the memory plan measures the same
function with ``jax.eval_shape`` (shapes and dtypes, no allocation). So the plan counts the
arrays the decoder will hold, in the dtypes their constructors choose, and a change to any
constructor (a new field, a cache in another dtype) changes the plan with it.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

from dflash_batch.decoder._decode_config import DecodeConfig
from dflash_batch.decoder._mesh import state_specs
from dflash_batch.decoder._slots import Slots
from dflash_batch.decoder._speculative import init_spec_state

DRAFTER_MODES = ("dflash", "hybrid")  # the modes that need a drafter
AUTO_BLOCKS = (1, 2, 4, 8)  # candidates below the largest block size
PROPOSER_BLOCK = 16  # the largest block of a mode without a drafter (its drafts cost no pass)
KV_LEAVES = ("k", "v")  # the target's KV cache
CONTEXT_LEAVES = ("ctx_k", "ctx_v", "tokens")  # the drafter's context K/V and the n-gram token history


def decode_blocks(config: DecodeConfig, drafter_block: int | None) -> tuple[int, ...]:
    """The block lengths a decoder may verify: (1,) for AR, the fixed ``block_size``, or for
    "auto" the candidates below the largest (the drafter's block size, else ``PROPOSER_BLOCK``)
    and the largest itself."""
    if config.mode == "ar":
        return (1,)
    largest = drafter_block if config.mode in DRAFTER_MODES else PROPOSER_BLOCK
    if config.block_size == "auto":
        return tuple(b for b in AUTO_BLOCKS if b < largest) + (largest,)
    return (config.block_size,)


def cache_length(bucket: int, config: DecodeConfig) -> int:
    """Cache rows per slot for prompts of up to ``bucket`` tokens: the prompt rounded up to whole
    prefill chunks (prefill writes whole chunks), plus the completion capacity."""
    return -(-bucket // config.prefill_chunk) * config.prefill_chunk + config.max_new_tokens


def new_state(cfg, dcfg, config: DecodeConfig, cache_len: int, blocks: tuple[int, ...]) -> Slots:
    """Zeroed slot state of one static batch: the target's KV cache, per-row bookkeeping and,
    in the speculative modes, the token history and (with a drafter) its context K/V."""
    b, cap, blk = config.batch_size, config.max_new_tokens, max(blocks)
    if config.mode == "ar":
        return Slots.init(cfg, b, cache_len, cap, 1)
    dcfg = dcfg if config.mode in DRAFTER_MODES else None
    return Slots.init(cfg, b, cache_len, cap, blk, extra=init_spec_state(b, cache_len, dcfg, blk))


def state_bytes(cfg, dcfg, config: DecodeConfig, bucket: int, data: int = 1,
                model: int = 1) -> tuple[dict[str, int], str]:
    """Bytes per chip of one bucket's state on a ``data`` x ``model`` mesh, in three parts:
    ``kv_cache`` (``KV_LEAVES``), ``context`` (``CONTEXT_LEAVES``) and ``slots`` (the rest), and
    the KV cache's dtype.

    1. Trace ``new_state`` abstractly: every array's shape and dtype, nothing allocated.
    2. Give each array its mesh layout (``state_specs``, the layout the decoder places it in).
    3. Divide each array's bytes by the mesh axes it is split over.
    """
    blocks = decode_blocks(config, dcfg.block_size if dcfg is not None else None)
    shapes = jax.eval_shape(lambda: new_state(cfg, dcfg, config, cache_length(bucket, config), blocks))
    axis = {"data": data, "model": model}
    parts, cache_dtype = {"kv_cache": 0, "context": 0, "slots": 0}, ""
    named_specs = jax.tree_util.tree_flatten_with_path(state_specs(shapes), is_leaf=lambda x: isinstance(x, P))[0]
    for (path, spec), leaf in zip(named_specs, jax.tree.leaves(shapes)):
        name = str(getattr(path[-1], "name", getattr(path[-1], "key", path[-1])))
        split = math.prod(axis[a] for a in spec if a is not None)
        part = "kv_cache" if name in KV_LEAVES else "context" if name in CONTEXT_LEAVES else "slots"
        parts[part] += math.prod(leaf.shape) * leaf.dtype.itemsize // split
        cache_dtype = str(leaf.dtype) if name in KV_LEAVES else cache_dtype
    return parts, cache_dtype
