"""The numerics setting: which dtype a job's weights, activations and caches are held in.

A job names one of ``DTYPES``. ``"auto"`` is resolved once, before anything loads, by
``resolve_dtype``; the resolved name is what loads the model and what the job's records
(stats, manifest, completions) keep, since the dtype changes completions.

Why ``"auto"`` resolves as it does:
  * On an accelerator (TPU, GPU) the matrix units are bfloat16-native and decoding is bound by
    the bytes streamed per token, so a float checkpoint runs in bfloat16, whatever it is stored
    in (``ACCELERATOR_AUTO``). A float32 checkpoint is usually float32 for exactness of storage,
    not for serving: the embedded SmolLM2 is a GGUF import kept as its exact dequantized float32
    values, and the model itself was published in bfloat16. vLLM's ``dtype="auto"`` makes the
    same choice for float32 checkpoints. Ask for ``"float32"`` to keep it.
  * On CPU it is float32 (``CPU_AUTO``): a bf16 step is faster here, but bf16 compiles slower,
    and for the small jobs a CPU runs float32 finishes first (the numbers are in docs/design.md;
    the script is ``python tools/dtype_speed.py``).

The names are the dtype names of numpy/JAX, so a later ``"int8"`` or ``"float8_e4m3fn"`` fits
beside them: add it to ``DTYPES`` and ``ACCELERATOR_AUTO``, with its loader.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

# What a job may ask for; every name but "auto" is also a resolved dtype.
DTYPES = ("auto", "bfloat16", "float32")

# Measured on the project's 2-core CPU machines with this decoder (docs/design.md, "dtype"): a
# SmolLM2-135M decode step runs 1.4-2.2x faster in bfloat16, but its programs compile 3-4x
# slower, which outweighs the steps in a job of under about 100 rows. Long CPU jobs: bfloat16.
CPU_AUTO = "float32"

# A checkpoint's stored dtype -> the dtype "auto" runs it in on an accelerator.
ACCELERATOR_AUTO = {"bfloat16": "bfloat16", "float16": "bfloat16", "float32": "bfloat16"}


class DtypeError(ValueError):
    """A dtype setting that cannot be used; the message names the accepted values."""


def checkpoint_dtype(config: Mapping[str, Any]) -> str:
    """The dtype a Hugging Face ``config.json`` says its weights are stored in.

    transformers >= 4.56 writes ``dtype``, older versions ``torch_dtype``; either may read
    ``"torch.bfloat16"``. A config naming neither means float32 (transformers' own default).
    """
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(name).removeprefix("torch.")


def jnp_dtype(name: str):
    """The JAX dtype of a resolved name (``"bfloat16"`` -> ``jnp.bfloat16``)."""
    if name == "auto" or name not in DTYPES:
        raise DtypeError(f"dtype must be one of {'/'.join(DTYPES[1:])} once resolved, got {name!r}")
    return jnp.dtype(name)


def resolve_dtype(setting: str, config: Mapping[str, Any] | None = None, platform: str | None = None) -> str:
    """The dtype a job runs in: ``setting`` itself, or for ``"auto"`` the choice above.

    ``config``: the target checkpoint's config.json (None: treated as float32).
    ``platform``: ``"cpu"``, ``"tpu"``, ``"gpu"``...; None means this process's JAX backend.
    Raises DtypeError for an unknown setting, or a checkpoint dtype "auto" has no rule for.
    """
    if setting not in DTYPES:
        raise DtypeError(f"dtype must be one of {'/'.join(DTYPES)}, got {setting!r}")
    if setting != "auto":
        return setting
    if platform is None:
        import jax

        platform = jax.default_backend()
    if platform == "cpu":
        return CPU_AUTO
    stored = checkpoint_dtype(config or {})
    if stored not in ACCELERATOR_AUTO:
        raise DtypeError(f"dtype 'auto' has no rule for a checkpoint stored in {stored!r}; "
                         f"set one of {'/'.join(DTYPES[1:])}")
    return ACCELERATOR_AUTO[stored]
