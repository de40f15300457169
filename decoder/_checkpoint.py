"""Loading a target model from a Hugging Face checkpoint folder.

Config, tokenizer and chat template come from ``transformers``; weights go from
safetensors straight into JAX arrays. Nothing in a checkpoint can run code:
``trust_remote_code`` is never passed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors import safe_open

from dflash_batch.decoder._config import TargetConfig
from dflash_batch.decoder._mesh import is_sharded, layout_params
from dflash_batch.decoder._target import Params
from dflash_batch.decoder._weights import Row, params_from_table


@dataclasses.dataclass(frozen=True)
class TargetModel:
    """A loaded target: config, parameters, tokenizer, and where it came from."""

    name: str
    config: TargetConfig
    params: Params
    tokenizer: Any
    path: Path
    mesh: Any = None  # the jax Mesh its parameters are laid out on; None: one device

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))


def read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder (sharded or not) as numpy arrays."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    out: dict[str, np.ndarray] = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for key in st.keys():
                out[key] = st.get_tensor(key)
    return out


def target_table(cfg: TargetConfig, tensors: Mapping[str, np.ndarray] | None = None) -> list[Row]:
    """The name table of a Hugging Face Llama / Qwen3 checkpoint (see ``_weights``).

    Tied embeddings, or a checkpoint without ``lm_head.weight``, use the embedding as the head.
    """
    p = "model.layers.{i}."
    table = [
        Row(("embed",), ("model.embed_tokens.weight",)),
        Row(("final_norm",), ("model.norm.weight",)),
        Row(("layers", "attn_norm"), (p + "input_layernorm.weight",), layered=True),
        Row(("layers", "qkv"), tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv"), transpose=True, layered=True),
        Row(("layers", "o"), (p + "self_attn.o_proj.weight",), transpose=True, layered=True),
        Row(("layers", "mlp_norm"), (p + "post_attention_layernorm.weight",), layered=True),
        Row(("layers", "gate_up"), (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), transpose=True,
            layered=True),
        Row(("layers", "down"), (p + "mlp.down_proj.weight",), transpose=True, layered=True),
    ]
    if cfg.qk_norm:
        table += [Row(("layers", "q_norm"), (p + "self_attn.q_norm.weight",), layered=True),
                  Row(("layers", "k_norm"), (p + "self_attn.k_norm.weight",), layered=True)]
    if not cfg.tie_word_embeddings and (tensors is None or "lm_head.weight" in tensors):
        table.append(Row(("lm_head",), ("lm_head.weight",), transpose=True))
    return table


def params_from_hf(cfg: TargetConfig, tensors: Mapping[str, np.ndarray], dtype=None, mesh=None) -> Params:
    """The target's stacked, fused, [in, out] parameters in ``dtype`` (default: ``cfg.dtype``),
    on one device or, with a ``mesh`` of more than one device, straight into its shards."""
    place = (lambda host: layout_params(host, cfg, mesh)) if is_sharded(mesh) else None
    return params_from_table(target_table(cfg, tensors), tensors, cfg.num_layers, dtype or cfg.dtype, place=place)


def load_target(name_or_path: str, dtype: Any = "float32", with_tokenizer: bool = True, mesh=None) -> TargetModel:
    """Loads a target from a model name, a local folder or a ``gs://`` prefix.

    ``dtype`` (anything ``jnp.dtype`` accepts: "bfloat16", jnp.float32, ...) is the model's
    numerics: weights, activations and KV cache (``config.dtype`` records it). With a
    ``mesh`` of more than one device, each weight goes from the host straight into its
    shards (see ``_mesh``); the returned model's ``mesh`` says so.
    """
    from dflash_batch.decoder._registry import resolve_model_dir

    folder = resolve_model_dir(name_or_path)
    cfg = TargetConfig.from_hf(json.loads((folder / "config.json").read_text()), dtype=dtype)
    params = params_from_hf(cfg, read_safetensors(folder), mesh=mesh)
    tokenizer = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return TargetModel(name=name_or_path, config=cfg, params=params, tokenizer=tokenizer, path=folder,
                       mesh=mesh if is_sharded(mesh) else None)
