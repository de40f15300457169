"""The DFlash drafter's configuration, read from and written to z-lab's config.json.

Two optional extensions live under ``dflash_config`` so other runtimes can read them:
  * ``mask_embedding: true`` -- a learned [D] vector (tensor ``mask_embedding``) replaces
    the embedding row of ``mask_token_id``; for targets such as SmolLM2 with no spare row.
  * ``draft_vocab_size: V_d`` -- the drafter scores only V_d tokens with its own
    ``lm_head.weight`` [V_d, D]; tensor ``d2t`` [V_d] holds the target id of each draft id
    (absolute ids, not the offsets EAGLE-3 checkpoints store).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from dflash_batch.decoder._config import TargetConfig, dtype_name, read_rope

ARCHITECTURE = "DFlashDraftModel"


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> tuple[int, ...]:
    """z-lab's rule when a config names no layers: one per draft layer, spread over 1..L-3.

    Python's round (half to even) is what z-lab uses, so keep it. Qwen3-8B (36 layers,
    5 draft layers) gives (1, 9, 17, 25, 33).
    """
    if num_draft_layers == 1:
        return (num_target_layers // 2,)
    span = num_target_layers - 4
    return tuple(int(round(1 + i * span / (num_draft_layers - 1))) for i in range(num_draft_layers))


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
    """Shape and numerics of a DFlash drafter.

    ``head_dim``, ``rope_theta`` and ``rope_scaling`` carry the same names as on
    TargetConfig so ``rope_inv_freq`` serves both: the drafter's RoPE comes from its
    own config, as in z-lab's model.
    """

    block_size: int  # L: anchor + L-1 masks
    mask_token_id: int
    target_layer_ids: tuple[int, ...]  # n_f layers whose outputs form the context features
    num_layers: int
    hidden_size: int  # D (must equal the target's)
    intermediate_size: int  # F
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rope_theta: float
    rms_norm_eps: float
    vocab_size: int  # V, the target's vocabulary
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    num_target_layers: int | None = None
    mask_embedding: bool = False
    draft_vocab_size: int | None = None  # V_d; None = the full target vocabulary
    dtype: str = "float32"  # weights, activations and context cache, as loaded

    def __post_init__(self):
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.block_size < 2:
            raise ValueError(f"a draft block needs an anchor and at least one mask: {self.block_size=}")
        if not self.target_layer_ids:
            raise ValueError(f"{self.target_layer_ids=} is empty")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"{self.mask_token_id=} is outside the target vocabulary ({self.vocab_size=})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads=} is not a multiple of {self.num_kv_heads=}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim=}")
        if self.draft_vocab_size is not None and not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"{self.draft_vocab_size=} must be in 1..{self.vocab_size=}")
        if self.num_target_layers is not None and max(self.target_layer_ids) >= self.num_target_layers:
            raise ValueError(f"{self.target_layer_ids=} exceed {self.num_target_layers=}")

    @property
    def group_size(self) -> int:  # G = N / K
        return self.num_heads // self.num_kv_heads

    @property
    def num_features(self) -> int:  # n_f
        return len(self.target_layer_ids)

    @property
    def out_vocab_size(self) -> int:  # V or V_d: the last axis of draft_block's logits
        return self.draft_vocab_size or self.vocab_size

    def check_target(self, target: TargetConfig) -> None:
        """Raises ValueError when this drafter cannot run on ``target``."""
        if self.hidden_size != target.hidden_size:
            raise ValueError(f"drafter {self.hidden_size=} differs from the target's {target.hidden_size=}")
        if self.vocab_size != target.vocab_size:
            raise ValueError(f"drafter {self.vocab_size=} differs from the target's {target.vocab_size=}")
        if max(self.target_layer_ids) >= target.num_layers:
            raise ValueError(f"{self.target_layer_ids=} exceed the target's {target.num_layers=}")

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], dtype: Any = "float32") -> "DrafterConfig":
        """Builds the config from a z-lab DFlash config.json dictionary, to run in ``dtype``."""
        archs = list(cfg.get("architectures") or ())
        if ARCHITECTURE not in archs:
            raise ValueError(f"not a DFlash drafter: architectures={archs!r}, expected [{ARCHITECTURE!r}]")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError("drafters with attention or MLP biases are not supported")
        if cfg.get("use_sliding_window"):
            raise ValueError("drafters with sliding-window attention are not supported")
        dflash = cfg.get("dflash_config") or {}
        if "mask_token_id" not in dflash:
            raise ValueError("config.json lacks dflash_config.mask_token_id")
        block_size = cfg.get("block_size", dflash.get("block_size"))
        if block_size is None:
            raise ValueError("config.json lacks block_size")
        n_layers = int(cfg["num_hidden_layers"])
        n_target = cfg.get("num_target_layers")
        ids = dflash.get("target_layer_ids")
        if ids is None:
            if n_target is None:
                raise ValueError("config.json names neither dflash_config.target_layer_ids nor num_target_layers")
            ids = default_target_layer_ids(int(n_target), n_layers)
        rope_theta, scaling = read_rope(cfg)
        n_heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
        v_d = dflash.get("draft_vocab_size")
        return cls(
            block_size=int(block_size),
            mask_token_id=int(dflash["mask_token_id"]),
            target_layer_ids=tuple(int(i) for i in ids),
            num_layers=n_layers,
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_heads=n_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or hidden // n_heads),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            vocab_size=int(cfg["vocab_size"]),
            rope_scaling=None if not scaling else tuple(sorted((k, v) for k, v in scaling.items() if not isinstance(v, (list, dict)))),
            num_target_layers=None if n_target is None else int(n_target),
            mask_embedding=bool(dflash.get("mask_embedding", False)),
            draft_vocab_size=None if v_d is None else int(v_d),
            dtype=dtype_name(dtype),
        )

    def to_hf(self) -> dict[str, Any]:
        """The z-lab config.json dictionary; ``from_hf(to_hf())`` round-trips."""
        dflash: dict[str, Any] = {"mask_token_id": self.mask_token_id, "target_layer_ids": list(self.target_layer_ids)}
        if self.mask_embedding:
            dflash["mask_embedding"] = True
        if self.draft_vocab_size is not None:
            dflash["draft_vocab_size"] = self.draft_vocab_size
        out = {
            "architectures": [ARCHITECTURE],
            "model_type": "qwen3",  # z-lab's model subclasses Qwen3; its loader reads a Qwen3Config
            "block_size": self.block_size,
            "dflash_config": dflash,
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "rms_norm_eps": self.rms_norm_eps,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": False,
        }
        if self.num_target_layers is not None:
            out["num_target_layers"] = self.num_target_layers
        return out
