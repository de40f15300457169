"""JAX target models, DFlash drafters, and autoregressive / speculative decoding.

Axis alphabet, used in einsum strings and shape comments throughout:
  B batch (slots)        T new tokens in a pass     S cache / context length
  N query heads          K kv heads                 G = N / K (query heads per kv head)
  H head dim             D model dim                F MLP hidden dim
  V vocabulary           L draft block size         C completion capacity per slot

This package never imports Beam or click: it runs as-is on an accelerator host.
"""

from dflash_batch.decoder._cache import KVCache
from dflash_batch.decoder._checkpoint import TargetModel, load_target, params_from_hf, read_safetensors
from dflash_batch.decoder._compile_cache import enable_compilation_cache
from dflash_batch.decoder._config import TargetConfig
from dflash_batch.decoder._drafter import DrafterConfig, load_drafter
from dflash_batch.decoder._decoder import DRAFTER_MODES, MODES, Decoder, timed_generate
from dflash_batch.decoder._engine import DEFAULT_PROMPT_BUCKETS, ROWS_PER_SLOT, bucket_for
from dflash_batch.decoder._memory import (HBM_PER_CHIP, LayoutError, MemoryPlan, cache_length, chip_count,
                                          choose_layout, local_capacity, plan)
from dflash_batch.decoder._mesh import data_sharding, describe, make_mesh
from dflash_batch.decoder._registry import DEFAULT_MODEL, resolve_drafter_dir, resolve_model_dir
from dflash_batch.decoder._prompts import render_messages, tokenize_prompt
from dflash_batch.decoder._requests import Request, Result
from dflash_batch.decoder._target import forward

__all__ = [
    "HBM_PER_CHIP", "LayoutError", "MemoryPlan", "cache_length", "chip_count", "choose_layout", "local_capacity", "plan",
    "data_sharding", "describe", "make_mesh",
    "DEFAULT_MODEL", "DEFAULT_PROMPT_BUCKETS", "ROWS_PER_SLOT", "resolve_drafter_dir", "resolve_model_dir", "DRAFTER_MODES", "MODES", "Decoder", "KVCache", "Request", "Result", "TargetConfig", "TargetModel", "DrafterConfig", "load_drafter",
    "bucket_for", "enable_compilation_cache", "forward", "load_target", "params_from_hf", "read_safetensors", "render_messages",
    "timed_generate", "tokenize_prompt",
]
