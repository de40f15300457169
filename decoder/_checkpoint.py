"""Loading a target model from a Hugging Face checkpoint folder.

Config, tokenizer and chat template come from ``transformers``; weights go from
safetensors straight into JAX arrays. Nothing in a checkpoint can run code:
``trust_remote_code`` is never passed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from dflash_batch.decoder._config import TargetConfig
from dflash_batch.decoder._mesh import is_sharded, layout_params
from dflash_batch.decoder._target import Params


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


def params_from_hf(cfg: TargetConfig, tensors: dict[str, np.ndarray], dtype=jnp.float32, host: bool = False) -> Params:
    """Maps Hugging Face tensor names to the stacked, fused, [in, out] layout.

    With ``host``, the arrays stay numpy on the host (for placing onto a mesh shard by shard).
    """
    as_array = (lambda a, dt: np.asarray(a, np.dtype(dt))) if host else jnp.asarray

    def get(name: str) -> np.ndarray:
        try:
            return np.asarray(tensors[name], dtype=np.float32)
        except KeyError:
            raise KeyError(f"checkpoint is missing tensor {name!r}") from None

    def stack(fmt: str, transform=lambda a: a) -> jnp.ndarray:
        return as_array(np.stack([transform(get(fmt.format(i))) for i in range(cfg.num_layers)]), dtype)

    p = "model.layers.{}."

    def fused(*names: str):
        return lambda i: np.concatenate([get(p.format(i) + n).T for n in names], axis=1)

    layers = {
        "attn_norm": stack(p + "input_layernorm.weight"),
        "qkv": as_array(
            np.stack([fused("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")(i) for i in range(cfg.num_layers)]),
            dtype,
        ),
        "o": stack(p + "self_attn.o_proj.weight", np.transpose),
        "mlp_norm": stack(p + "post_attention_layernorm.weight"),
        "gate_up": as_array(
            np.stack([fused("mlp.gate_proj.weight", "mlp.up_proj.weight")(i) for i in range(cfg.num_layers)]), dtype
        ),
        "down": stack(p + "mlp.down_proj.weight", np.transpose),
    }
    if cfg.qk_norm:
        layers["q_norm"] = stack(p + "self_attn.q_norm.weight")
        layers["k_norm"] = stack(p + "self_attn.k_norm.weight")
    params: Params = {
        "embed": as_array(get("model.embed_tokens.weight"), dtype),
        "final_norm": as_array(get("model.norm.weight"), dtype),
        "layers": layers,
    }
    if not cfg.tie_word_embeddings and "lm_head.weight" in tensors:
        params["lm_head"] = as_array(get("lm_head.weight").T, dtype)
    return params


def load_target(name_or_path: str, dtype=jnp.float32, with_tokenizer: bool = True, mesh=None) -> TargetModel:
    """Loads a target from a model name, a local folder or a ``gs://`` prefix.

    With a ``mesh`` of more than one device, each weight goes from the host straight into its
    shards (see ``_mesh``); the returned model's ``mesh`` says so.
    """
    from dflash_batch.decoder._registry import resolve_model_dir

    folder = resolve_model_dir(name_or_path)
    cfg = TargetConfig.from_hf(json.loads((folder / "config.json").read_text()))
    if is_sharded(mesh):
        params = layout_params(params_from_hf(cfg, read_safetensors(folder), dtype, host=True), cfg, mesh)
    else:
        params = params_from_hf(cfg, read_safetensors(folder), dtype)
    tokenizer = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return TargetModel(name=name_or_path, config=cfg, params=params, tokenizer=tokenizer, path=folder,
                       mesh=mesh if is_sharded(mesh) else None)
