"""JAX target models, DFlash drafters, and autoregressive / speculative decoding.

Axis alphabet, used in einsum strings and shape comments throughout:
  B batch (slots)        T new tokens in a pass     S cache / context length
  N query heads          K kv heads                 G = N / K (query heads per kv head)
  H head dim             D model dim                F MLP hidden dim
  V vocabulary           L verified block length    C completion capacity per slot
Layer axes are spelt out (``layers``, ``draft_layers``).

Numerics. ``load_target(..., dtype=)`` and ``load_drafter(..., dtype=)`` take any dtype
``jnp.dtype`` accepts; the config records it (``config.dtype``). Weights, the residual
stream, every activation between layers, the KV cache and the drafter's context cache
are in that dtype: in bfloat16 a decode step streams half the bytes of float32 and runs
on a TPU's bf16 matrix units. Float32 is kept where rounding would change a token:
  * matmuls accumulate in float32 (``preferred_element_type``) and round once: a long
    bf16 running sum loses the low bits of every term;
  * RMSNorm statistics and scaling are float32: a mean of squares of activations in the
    hundreds keeps no significant bit of the small ones in bf16;
  * RoPE angles and rotations are float32: positions in the thousands times a frequency
    need more than bf16's 8 bits of mantissa;
  * attention scores, softmax and the weighted sum of values accumulate in float32 (the
    kernels and their references alike); the probabilities meet V in V's dtype;
  * the final logits are float32, and so are sampling (temperature, top-p, Gumbel noise)
    and acceptance: they pick the token, so a tie broken by bf16 rounding would be a
    different output.
A 1-token AR step and an L-token verify pass must round every value the same way, or in
bf16 a last-bit difference grows into another token. So no sum may depend on how many rows share
a call: every matmul runs as at least two rows (XLA's CPU routine for one row sums in another
order; ``_layers.matmul_rows``); RMSNorm's mean and the softmax denominator are fixed-order sums
(``kernels/_ordered_sum.py``); the reference verify attention takes one softmax over the cache with
the block written in, never "cache part + block part"; and XLA may not skip a rounding the code
asks for (``_xla_flags``). In bf16, speculative greedy output is token-identical to AR
(docs/design.md, "Numerics").

This package never imports Beam or click: it runs as-is on an accelerator host.
"""

from dflash_batch.decoder import _xla_flags  # noqa: F401  (first: sets XLA_FLAGS before anything can start JAX)
from dflash_batch.decoder._cache import KVCache
from dflash_batch.decoder._checkpoint import TargetModel, load_target, params_from_hf, read_safetensors
from dflash_batch.decoder._compile_cache import enable_compilation_cache
from dflash_batch.decoder._config import TargetConfig
from dflash_batch.decoder._decode_config import DEFAULT_PROMPT_BUCKETS, DecodeConfig, DecodeConfigError
from dflash_batch.decoder._drafter_checkpoint import Drafter, load_drafter
from dflash_batch.decoder._drafter_config import DrafterConfig
from dflash_batch.decoder._decoder import DRAFTER_MODES, Decoder
from dflash_batch.decoder._engine import ROWS_PER_SLOT, BatchRun, bucket_for
from dflash_batch.schemas import MODES
from dflash_batch.decoder._memory import (HBM_PER_CHIP, LayoutError, MemoryPlan, chip_count, choose_layout,
                                          local_capacity, plan)
from dflash_batch.decoder._state import cache_length
from dflash_batch.decoder._mesh import describe, make_mesh
from dflash_batch.decoder._registry import DEFAULT_MODEL, registered_models, resolve_drafter_dir, resolve_model_dir
from dflash_batch.decoder._storage import cache_dir
from dflash_batch.decoder._prompts import (SUMMARIZE_INSTRUCTION, render_messages, render_row, summarize_messages,
                                           tokenize_prompt)
from dflash_batch.decoder._requests import Request, Result
from dflash_batch.decoder._target import forward

__all__ = [
    "BatchRun", "bucket_for", "cache_dir", "cache_length", "chip_count", "choose_layout",
    "DecodeConfig", "DecodeConfigError", "Decoder", "DEFAULT_MODEL", "DEFAULT_PROMPT_BUCKETS", "describe",
    "Drafter", "DRAFTER_MODES", "DrafterConfig", "enable_compilation_cache", "forward", "HBM_PER_CHIP",
    "KVCache", "LayoutError", "load_drafter", "load_target", "local_capacity", "make_mesh", "MemoryPlan",
    "MODES", "params_from_hf", "plan", "read_safetensors", "registered_models",
    "render_messages", "Request", "resolve_drafter_dir", "resolve_model_dir", "Result", "ROWS_PER_SLOT",
    "TargetConfig", "TargetModel", "tokenize_prompt",
    "render_row", "SUMMARIZE_INSTRUCTION", "summarize_messages",
]

# The numerics setting (a job's [model] dtype) and how "auto" resolves.
from dflash_batch.decoder._dtype import DTYPES, DtypeError, checkpoint_dtype, jnp_dtype, resolve_dtype  # noqa: E402

__all__ += ["checkpoint_dtype", "DTYPES", "DtypeError", "jnp_dtype", "resolve_dtype"]
