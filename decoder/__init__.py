"""JAX target models, DFlash drafters, and autoregressive / speculative decoding.

Axis alphabet, used in einsum strings and shape comments throughout:
  B batch (slots)        T new tokens in a pass     S cache / context length
  N query heads          K kv heads                 G = N / K (query heads per kv head)
  H head dim             D model dim                F MLP hidden dim
  V vocabulary           L verified block length    C completion capacity per slot
Layer axes are spelt out (``layers``, ``draft_layers``).

This package never imports Beam or click: it runs as-is on an accelerator host.
"""

from dflash_batch.decoder._cache import KVCache
from dflash_batch.decoder._checkpoint import TargetModel, load_target, params_from_hf, read_safetensors
from dflash_batch.decoder._compile_cache import enable_compilation_cache
from dflash_batch.decoder._config import TargetConfig
from dflash_batch.decoder._decode_config import DEFAULT_PROMPT_BUCKETS, DecodeConfig, DecodeConfigError
from dflash_batch.decoder._drafter import Drafter, DrafterConfig, load_drafter, place_drafter
from dflash_batch.decoder._decoder import DRAFTER_MODES, Decoder, timed_generate
from dflash_batch.decoder._engine import ROWS_PER_SLOT, BatchRun, bucket_for
from dflash_batch.schemas import MODES
from dflash_batch.decoder._memory import (HBM_PER_CHIP, LayoutError, MemoryPlan, cache_length, chip_count,
                                          choose_layout, local_capacity, plan)
from dflash_batch.decoder._mesh import data_sharding, describe, make_mesh
from dflash_batch.decoder._registry import DEFAULT_MODEL, registered_models, resolve_drafter_dir, resolve_model_dir
from dflash_batch.decoder._storage import cache_dir
from dflash_batch.decoder._prompts import render_messages, tokenize_prompt
from dflash_batch.decoder._requests import Request, Result
from dflash_batch.decoder._target import forward

__all__ = [
    "BatchRun", "bucket_for", "cache_dir", "cache_length", "chip_count", "choose_layout", "data_sharding",
    "DecodeConfig", "DecodeConfigError", "Decoder", "DEFAULT_MODEL", "DEFAULT_PROMPT_BUCKETS", "describe",
    "Drafter", "DRAFTER_MODES", "DrafterConfig", "enable_compilation_cache", "forward", "HBM_PER_CHIP",
    "KVCache", "LayoutError", "load_drafter", "load_target", "local_capacity", "make_mesh", "MemoryPlan",
    "MODES", "params_from_hf", "place_drafter", "plan", "read_safetensors", "registered_models",
    "render_messages", "Request", "resolve_drafter_dir", "resolve_model_dir", "Result", "ROWS_PER_SLOT",
    "TargetConfig", "TargetModel", "timed_generate", "tokenize_prompt",
]

# The numerics setting (a job's [model] dtype) and how "auto" resolves.
from dflash_batch.decoder._dtype import DTYPES, DtypeError, checkpoint_dtype, jnp_dtype, resolve_dtype  # noqa: E402

__all__ += ["checkpoint_dtype", "DTYPES", "DtypeError", "jnp_dtype", "resolve_dtype"]
