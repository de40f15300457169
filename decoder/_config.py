"""Frozen model configurations, built from a checkpoint's config.json."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

_LLAMA_ARCHS = ("LlamaForCausalLM",)
FLOAT_DTYPES = ("bfloat16", "float16", "float32")


def dtype_name(dtype: Any, field: str = "dtype") -> str:
    """The canonical name ("bfloat16", "float32", ...) of anything ``jnp.dtype`` accepts.

    Configs hold the name, not the dtype object, so they stay hashable, printable and
    comparable as jit static arguments.
    """
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        raise ValueError(f"{field}={dtype!r} is not a dtype; use one of {FLOAT_DTYPES}") from None
    if name not in FLOAT_DTYPES:
        raise ValueError(f"{field}={dtype!r} is not a floating-point model dtype; use one of {FLOAT_DTYPES}")
    return name

_QWEN3_ARCHS = ("Qwen3ForCausalLM",)


def read_rope(cfg: Mapping[str, Any]) -> tuple[Any, Mapping[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from an HF config, old or new style.

    Newer transformers nest RoPE settings under ``rope_parameters``; a "default"
    rope type means no scaling.
    """
    rope_theta, scaling = cfg.get("rope_theta"), cfg.get("rope_scaling")
    nested = cfg.get("rope_parameters")
    if isinstance(nested, Mapping):
        rope_theta = nested.get("rope_theta", rope_theta)
        if nested.get("rope_type", "default") != "default":
            scaling = dict(nested)
    if isinstance(scaling, Mapping) and (scaling.get("rope_type") or scaling.get("type")) == "default":
        scaling = None
    return rope_theta, scaling


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """Shape and numerics of a Llama- or Qwen3-family causal LM.

    The two families share one transformer; Qwen3 adds an RMSNorm on each head's
    queries and keys (``qk_norm``) before RoPE.
    """

    family: str  # 'llama' | 'qwen3'
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # llama3-style, as sorted items
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"  # weights, activations and KV cache, as loaded (see the package docstring)

    def __post_init__(self):
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.family not in ("llama", "qwen3"):
            raise ValueError(f"unsupported model family {self.family=}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads=} is not a multiple of {self.num_kv_heads=}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim=}")
        if self.rope_scaling is not None:
            kind = dict(self.rope_scaling).get("rope_type") or dict(self.rope_scaling).get("type")
            if kind not in ("llama3", "default"):
                raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: llama3, default")

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    @property
    def group_size(self) -> int:  # G = N / K
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], dtype: Any = "float32") -> "TargetConfig":
        """Builds the config from a Hugging Face config.json dictionary, to run in ``dtype``."""
        archs = tuple(cfg.get("architectures") or ())
        model_type = cfg.get("model_type", "")
        if any(a in _QWEN3_ARCHS for a in archs) or model_type == "qwen3":
            family = "qwen3"
        elif any(a in _LLAMA_ARCHS for a in archs) or model_type == "llama":
            family = "llama"
        else:
            raise ValueError(
                f"unsupported architecture {archs or model_type!r}: "
                "dflash-batch serves Llama- and Qwen3-family causal LMs"
            )
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError("checkpoints with attention or MLP biases are not supported")
        n_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        rope_theta, scaling = read_rope(cfg)
        return cls(
            family=family,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=n_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or hidden // n_heads),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rope_scaling=None if not scaling else tuple(sorted((k, v) for k, v in scaling.items() if not isinstance(v, (list, dict)))),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=dtype_name(dtype),
        )
