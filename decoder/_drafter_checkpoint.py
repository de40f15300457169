"""DFlash drafter checkpoints in z-lab's format: its name table, loading, saving, random init.

Checkpoints use z-lab's format (config.json with ``architectures: ["DFlashDraftModel"]``,
safetensors names without a ``model.`` prefix), so published drafters such as
z-lab/Qwen3-8B-DFlash-b16 load unchanged. The drafter owns no embedding and, unless it
has a reduced draft vocabulary, no lm_head: it borrows the frozen target's.

Parameters follow the target's layout: layers stacked on a leading axis, projections
stored [in, out], q|k|v and gate|up fused. The one loader (``_weights``) reads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dflash_batch.decoder._drafter_config import DrafterConfig
from dflash_batch.decoder._mesh import is_sharded, layout_params
from dflash_batch.decoder._weights import Params, Row, params_from_table, tensors_from_table


def drafter_table(cfg: DrafterConfig) -> list[Row]:
    """The name table of a z-lab drafter checkpoint (see ``_weights``)."""
    p = "layers.{i}."
    table = [
        Row(("fc",), ("fc.weight",), transpose=True),  # [n_f*D, D]
        Row(("hidden_norm",), ("hidden_norm.weight",)),
        Row(("norm",), ("norm.weight",)),
        Row(("layers", "attn_norm"), (p + "input_layernorm.weight",), layered=True),
        Row(("layers", "qkv"), tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv"), transpose=True, layered=True),
        Row(("layers", "q_norm"), (p + "self_attn.q_norm.weight",), layered=True),
        Row(("layers", "k_norm"), (p + "self_attn.k_norm.weight",), layered=True),
        Row(("layers", "o"), (p + "self_attn.o_proj.weight",), transpose=True, layered=True),
        Row(("layers", "mlp_norm"), (p + "post_attention_layernorm.weight",), layered=True),
        Row(("layers", "gate_up"), (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), transpose=True,
            layered=True),
        Row(("layers", "down"), (p + "mlp.down_proj.weight",), transpose=True, layered=True),
    ]
    if cfg.mask_embedding:
        table.append(Row(("mask_embedding",), ("mask_embedding",)))
    if cfg.draft_vocab_size is not None:
        table += [Row(("lm_head",), ("lm_head.weight",), transpose=True),  # [D, V_d]
                  Row(("d2t",), ("d2t",), cast=False)]
    return table


def _hf_shapes(cfg: DrafterConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``cfg`` holds, with its HF ([out, in]) shape."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, kh = cfg.num_heads * h, cfg.num_kv_heads * h
    shapes = {"fc.weight": (d, cfg.num_features * d), "hidden_norm.weight": (d,), "norm.weight": (d,)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (nh, d), p + "self_attn.k_proj.weight": (kh, d),
            p + "self_attn.v_proj.weight": (kh, d), p + "self_attn.o_proj.weight": (d, nh),
            p + "self_attn.q_norm.weight": (h,), p + "self_attn.k_norm.weight": (h,),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
        })
    if cfg.mask_embedding:
        shapes["mask_embedding"] = (d,)
    if cfg.draft_vocab_size is not None:
        shapes["lm_head.weight"] = (cfg.draft_vocab_size, d)
        shapes["d2t"] = (cfg.draft_vocab_size,)
    return shapes


def _check_d2t(cfg: DrafterConfig, d2t: np.ndarray) -> None:
    if d2t.min() < 0 or d2t.max() >= cfg.vocab_size:
        raise ValueError(f"d2t holds ids outside the target vocabulary 0..{cfg.vocab_size - 1}")
    if len(np.unique(d2t)) != len(d2t):  # EAGLE-3 style offsets repeat; absolute ids cannot
        raise ValueError("d2t must hold distinct absolute target ids (EAGLE-3 offset tables are not accepted)")


def params_from_tensors(cfg: DrafterConfig, tensors: Mapping[str, np.ndarray], dtype=None, mesh=None) -> Params:
    """The drafter's parameters in ``dtype`` (default ``cfg.dtype``), every shape checked and
    no tensor left unread (an ignored tensor could silently change results); with a ``mesh``
    of more than one device, straight into its shards, laid out like the target's layers."""
    if cfg.draft_vocab_size is not None and "d2t" in tensors:
        _check_d2t(cfg, np.asarray(tensors["d2t"]))
    place = (lambda host: layout_params(host, cfg, mesh)) if is_sharded(mesh) else None
    params = params_from_table(drafter_table(cfg), tensors, cfg.num_layers, dtype or cfg.dtype,
                               shapes=_hf_shapes(cfg), exact=True, place=place)
    if "d2t" in params:
        params["d2t"] = params["d2t"].astype(jnp.int32)
    return params


def tensors_from_params(cfg: DrafterConfig, params: Params) -> dict[str, np.ndarray]:
    """The inverse of ``params_from_tensors``: z-lab names, [out, in], float32 (d2t int64)."""
    nh, kh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    f = cfg.intermediate_size
    split = {("layers", "qkv"): [nh, kh, kh], ("layers", "gate_up"): [f, f]}
    host = jax.tree.map(lambda a: np.asarray(a, np.int64 if a.dtype.kind == "i" else np.float32), params)
    return tensors_from_table(drafter_table(cfg), host, cfg.num_layers, split)


@flax.struct.dataclass
class Drafter:
    """A drafter ready to decode: its config (static under jit) and its parameters."""

    config: DrafterConfig = flax.struct.field(pytree_node=False)
    params: Params


def load_drafter(folder: str | Path, dtype: Any = "float32", mesh=None) -> Drafter:
    """Loads a z-lab format drafter from a local folder or ``gs://`` prefix, in ``dtype``
    (anything ``jnp.dtype`` accepts); with a ``mesh`` of more than one device, straight into
    its shards, laid out like the target's layers."""
    from dflash_batch.decoder._checkpoint import read_safetensors
    from dflash_batch.decoder._registry import resolve_model_dir

    path = resolve_model_dir(str(folder))
    cfg = DrafterConfig.from_hf(json.loads((path / "config.json").read_text()), dtype=dtype)
    return Drafter(cfg, params_from_tensors(cfg, read_safetensors(path), mesh=mesh))


def save_drafter(folder: str | Path, cfg: DrafterConfig, params: Params, dtype=jnp.bfloat16) -> Path:
    """Writes config.json + model.safetensors in z-lab's format; ``load_drafter`` reads it back."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(dtype)
    tensors = {
        name: np.ascontiguousarray(t if t.dtype.kind == "i" else t.astype(np_dtype))
        for name, t in tensors_from_params(cfg, params).items()
    }
    hf = cfg.to_hf()
    hf["torch_dtype"] = np_dtype.name  # "bfloat16" / "float32" / "float16", as transformers writes
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    # format=pt lets transformers (and so z-lab's PyTorch code) open the file too.
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def init_drafter_params(cfg: DrafterConfig, key: jax.Array, *, d2t: np.ndarray | None = None,
                        dtype=None, scale: float = 0.02) -> Params:
    """Random parameters (normal(0, scale) matrices, unit norms) in the loaded layout, in
    ``dtype`` (default ``cfg.dtype``).

    A reduced-vocabulary drafter needs ``d2t``: which target tokens it may draft is a
    choice (usually the most frequent ones in training text), not something to default.
    """
    dtype = dtype or cfg.dtype
    d, f, h, n_l = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_layers
    qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * h
    keys = iter(jax.random.split(key, 8))
    normal = lambda shape: (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)  # noqa: E731
    ones = lambda shape: jnp.ones(shape, dtype)  # noqa: E731
    params: Params = {
        "fc": normal((cfg.num_features * d, d)),
        "hidden_norm": ones((d,)),
        "norm": ones((d,)),
        "layers": {
            "attn_norm": ones((n_l, d)), "qkv": normal((n_l, d, qkv_out)),
            "q_norm": ones((n_l, h)), "k_norm": ones((n_l, h)),
            "o": normal((n_l, cfg.num_heads * h, d)), "mlp_norm": ones((n_l, d)),
            "gate_up": normal((n_l, d, 2 * f)), "down": normal((n_l, f, d)),
        },
    }
    if cfg.mask_embedding:
        params["mask_embedding"] = normal((d,))
    if cfg.draft_vocab_size is not None:
        if d2t is None:
            raise ValueError(f"a reduced-vocabulary drafter ({cfg.draft_vocab_size=}) needs d2t")
        d2t = np.asarray(d2t)
        if d2t.shape != (cfg.draft_vocab_size,):
            raise ValueError(f"{d2t.shape=} must be ({cfg.draft_vocab_size},)")
        _check_d2t(cfg, d2t)
        params["lm_head"] = normal((d, cfg.draft_vocab_size))
        params["d2t"] = jnp.asarray(d2t, jnp.int32)
    return params
