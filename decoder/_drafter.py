"""The DFlash drafter: a few Qwen3-style layers that draft a whole block in one pass.

Checkpoints use z-lab's format (config.json with ``architectures: ["DFlashDraftModel"]``,
safetensors names without a ``model.`` prefix), so published drafters such as
z-lab/Qwen3-8B-DFlash-b16 load unchanged. The drafter owns no embedding and, unless
it has a reduced draft vocabulary, no lm_head: it borrows the frozen target's.

Two optional extensions live under ``dflash_config`` so other runtimes can read them:
  * ``mask_embedding: true`` -- a learned [D] vector (tensor ``mask_embedding``) replaces
    the embedding row of ``mask_token_id``; for targets such as SmolLM2 with no spare row.
  * ``draft_vocab_size: V_d`` -- the drafter scores only V_d tokens with its own
    ``lm_head.weight`` [V_d, D]; tensor ``d2t`` [V_d] holds the target id of each draft id
    (absolute ids, not the offsets EAGLE-3 checkpoints store).

Parameters follow the target's layout: layers stacked on a leading axis, projections
stored [in, out], q|k|v and gate|up fused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dflash_batch.decoder._config import TargetConfig, read_rope
from dflash_batch.decoder._layers import apply_rope, mlp, qkv_proj, rms_norm, rope_inv_freq
from dflash_batch.decoder._mesh import is_sharded, layout_params
from dflash_batch.decoder._target import Params, embed, lm_head
from dflash_batch.kernels import draft_attention

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

    def __post_init__(self):
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
    def from_hf(cls, cfg: Mapping[str, Any]) -> "DrafterConfig":
        """Builds the config from a z-lab DFlash config.json dictionary."""
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


# --- checkpoint I/O -----------------------------------------------------------------


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


def params_from_tensors(cfg: DrafterConfig, tensors: Mapping[str, np.ndarray], dtype=jnp.float32,
                        host: bool = False) -> Params:
    """Maps z-lab tensor names to the stacked, fused, [in, out] layout, checking every shape.

    With ``host``, the arrays stay numpy on the host (for placing onto a mesh shard by shard).
    """
    as_array = (lambda a, dt: np.asarray(a, np.dtype(dt))) if host else jnp.asarray
    want = _hf_shapes(cfg)
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))  # an ignored tensor could silently change results
    if missing or unexpected:
        raise ValueError(f"drafter checkpoint does not match its config: {missing=} {unexpected=}")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, config implies {shape}")

    def get(name: str) -> np.ndarray:
        return np.asarray(tensors[name], np.float32)

    def stack(fn) -> jax.Array:
        return as_array(np.stack([fn(f"layers.{i}.") for i in range(cfg.num_layers)]), dtype)

    def fused(*names: str):
        return lambda p: np.concatenate([get(p + n).T for n in names], axis=1)

    params: Params = {
        "fc": as_array(get("fc.weight").T, dtype),  # [n_f*D, D]
        "hidden_norm": as_array(get("hidden_norm.weight"), dtype),
        "norm": as_array(get("norm.weight"), dtype),
        "layers": {
            "attn_norm": stack(lambda p: get(p + "input_layernorm.weight")),
            "qkv": stack(fused("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
            "q_norm": stack(lambda p: get(p + "self_attn.q_norm.weight")),
            "k_norm": stack(lambda p: get(p + "self_attn.k_norm.weight")),
            "o": stack(lambda p: get(p + "self_attn.o_proj.weight").T),
            "mlp_norm": stack(lambda p: get(p + "post_attention_layernorm.weight")),
            "gate_up": stack(fused("mlp.gate_proj.weight", "mlp.up_proj.weight")),
            "down": stack(lambda p: get(p + "mlp.down_proj.weight").T),
        },
    }
    if cfg.mask_embedding:
        params["mask_embedding"] = as_array(get("mask_embedding"), dtype)
    if cfg.draft_vocab_size is not None:
        d2t = np.asarray(tensors["d2t"])
        _check_d2t(cfg, d2t)
        params["lm_head"] = as_array(get("lm_head.weight").T, dtype)  # [D, V_d]
        params["d2t"] = as_array(d2t, jnp.int32)
    return params


def tensors_from_params(cfg: DrafterConfig, params: Params) -> dict[str, np.ndarray]:
    """The inverse of ``params_from_tensors``: z-lab names, [out, in], float32 (d2t int64)."""
    nh, kh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    f = cfg.intermediate_size
    a = lambda x: np.asarray(x, np.float32)
    lw = {k: a(v) for k, v in params["layers"].items()}
    out = {"fc.weight": a(params["fc"]).T, "hidden_norm.weight": a(params["hidden_norm"]), "norm.weight": a(params["norm"])}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        q, k, v = np.split(lw["qkv"][i], [nh, nh + kh], axis=1)
        gate, up = np.split(lw["gate_up"][i], [f], axis=1)
        out.update({
            p + "self_attn.q_proj.weight": q.T, p + "self_attn.k_proj.weight": k.T,
            p + "self_attn.v_proj.weight": v.T, p + "self_attn.o_proj.weight": lw["o"][i].T,
            p + "self_attn.q_norm.weight": lw["q_norm"][i], p + "self_attn.k_norm.weight": lw["k_norm"][i],
            p + "input_layernorm.weight": lw["attn_norm"][i], p + "post_attention_layernorm.weight": lw["mlp_norm"][i],
            p + "mlp.gate_proj.weight": gate.T, p + "mlp.up_proj.weight": up.T, p + "mlp.down_proj.weight": lw["down"][i].T,
        })
    if cfg.mask_embedding:
        out["mask_embedding"] = a(params["mask_embedding"])
    if cfg.draft_vocab_size is not None:
        out["lm_head.weight"] = a(params["lm_head"]).T
        out["d2t"] = np.asarray(params["d2t"], np.int64)
    return out


@flax.struct.dataclass
class Drafter:
    """A drafter ready to decode: its config (static under jit) and its parameters."""

    config: DrafterConfig = flax.struct.field(pytree_node=False)
    params: Params


def load_drafter(folder: str | Path, dtype=jnp.float32, mesh=None) -> Drafter:
    """Loads a z-lab format drafter from a local folder or ``gs://`` prefix; with a ``mesh`` of
    more than one device, straight into its shards, laid out like the target's layers."""
    from dflash_batch.decoder._checkpoint import read_safetensors
    from dflash_batch.decoder._registry import resolve_model_dir

    path = resolve_model_dir(str(folder))
    cfg = DrafterConfig.from_hf(json.loads((path / "config.json").read_text()))
    if is_sharded(mesh):
        return Drafter(cfg, layout_params(params_from_tensors(cfg, read_safetensors(path), dtype, host=True), cfg, mesh))
    return Drafter(cfg, params_from_tensors(cfg, read_safetensors(path), dtype))


def place_drafter(drafter: Drafter, mesh) -> Drafter:
    """A drafter (host or one device) laid out on ``mesh``: for drafters made in memory
    (training, tests). Loading with ``load_drafter(..., mesh=)`` never gathers them."""
    if not is_sharded(mesh):
        return drafter
    return Drafter(drafter.config, layout_params(jax.device_get(drafter.params), drafter.config, mesh))


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
                        dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random parameters (normal(0, scale) matrices, unit norms) in the loaded layout.

    A reduced-vocabulary drafter needs ``d2t``: which target tokens it may draft is a
    choice (usually the most frequent ones in training text), not something to default.
    """
    d, f, h, n_l = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_layers
    qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * h
    keys = iter(jax.random.split(key, 8))
    normal = lambda shape: (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)
    ones = lambda shape: jnp.ones(shape, dtype)
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


# --- forward ------------------------------------------------------------------------


def context_kv(dparams: Params, dcfg: DrafterConfig, target_feats: jax.Array,
               positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Context keys and values of every draft layer for newly committed tokens.

    target_feats [B, T, n_f, D]: outputs of target layers ``target_layer_ids``;
    positions [B, T]: the tokens' absolute positions. Returns (k, v), each [draft_layers, B, T, K, H]
    (append them to the [draft_layers, B, K, S, H] context cache with ``_target.write_rows``).

    Steps:
      1. Concatenate the n_f features per token, project with ``fc`` and RMSNorm
         (``hidden_norm``): one context vector c per token.
      2. For every draft layer: k = RoPE(k_norm(c Wk)) at the token's position, v = c Wv.

    Context rows get no query, no MLP and no residual update, so their K/V depend on the
    target's features alone. They are computed once when a token is committed and
    appended to a per-layer cache; rejected drafts never touch them, so that cache needs
    no rollback.
    """
    b, t, n_f, d = target_feats.shape
    if (n_f, d) != (dcfg.num_features, dcfg.hidden_size):
        raise ValueError(f"target_feats {target_feats.shape=} must end in ({dcfg.num_features}, {dcfg.hidden_size})")
    k_heads, h = dcfg.num_kv_heads, dcfg.head_dim
    feats = target_feats.reshape(b, t, n_f * d).astype(dparams["fc"].dtype)  # [B, T, n_f*D]
    c = rms_norm(feats @ dparams["fc"], dparams["hidden_norm"], dcfg.rms_norm_eps)  # [B, T, D]
    inv_freq = rope_inv_freq(dcfg)
    kv_cols = dcfg.num_heads * h  # only the k|v columns of the fused qkv: context rows have no query

    def one_layer(w):
        if "qkv" in w:
            k, v = jnp.split(c @ w["qkv"][:, kv_cols:], 2, axis=-1)  # [B, T, K*H] each
        else:  # tensor-parallel layout: separate projections
            k, v = c @ w["k"], c @ w["v"]
        k = rms_norm(k.reshape(b, t, k_heads, h), w["k_norm"], dcfg.rms_norm_eps)  # [B, T, K, H]
        return apply_rope(k, positions, inv_freq), v.reshape(b, t, k_heads, h)

    layers = dparams["layers"]
    wanted = {n: layers[n] for n in ("qkv", "k", "v", "k_norm") if n in layers}
    return jax.vmap(one_layer)(wanted)  # [draft_layers, B, T, K, H] each


def draft_block(dparams: Params, dcfg: DrafterConfig, target_params: Params, target_cfg: TargetConfig,
                block_tokens: jax.Array, block_start: jax.Array, ctx_k: jax.Array, ctx_v: jax.Array,
                ctx_len: jax.Array) -> jax.Array:
    """Draft logits for block positions 1..L-1 of every row, from ONE drafter pass.

    block_tokens [B, L]: [anchor, MASK x (L-1)], the anchor being the last committed
    token; block_start [B]: the anchor's absolute position; ctx_k, ctx_v [draft_layers, B, K, S, H]
    from ``context_kv``, of which rows < ctx_len [B] are valid (later rows may hold
    anything finite). Returns logits [B, L-1, V] fp32, or [B, L-1, V_d] for a
    reduced-vocabulary drafter (map ids with ``draft_to_target_ids``).

    Steps:
      1. Embed the block with the TARGET's embedding. Mask tokens at positions 1..L-1 take
         the drafter's learned mask embedding when it has one (the anchor never does, even
         if it happens to equal mask_token_id).
      2. Per draft layer (Qwen3 pre-norm): q, k, v from the block only; q_norm / k_norm,
         then RoPE at block_start + arange(L).
      3. Attention over [context rows < ctx_len ; all L block rows] with NO causal mask:
         the masks are denoised jointly, so each position sees the others and the anchor.
      4. o_proj + residual, SwiGLU MLP + residual.
      5. Final ``norm``, then lm_head (the target's, tied or not, unless the drafter has its
         own reduced one) on rows 1..L-1: row 0 is the anchor, already committed.
    """
    dcfg.check_target(target_cfg)
    bsz, blk = block_tokens.shape  # B, L
    n, k_heads, g, h = dcfg.num_heads, dcfg.num_kv_heads, dcfg.group_size, dcfg.head_dim
    eps = dcfg.rms_norm_eps
    inv_freq = rope_inv_freq(dcfg)
    positions = block_start[:, None] + jnp.arange(blk, dtype=jnp.int32)[None, :]  # [B, L]

    x = embed(target_params, block_tokens)  # [B, L, D]
    if dcfg.mask_embedding:
        is_mask = (block_tokens == dcfg.mask_token_id) & (jnp.arange(blk) > 0)[None, :]  # [B, L]
        x = jnp.where(is_mask[..., None], dparams["mask_embedding"].astype(x.dtype), x)

    def layer(x, xs):
        w, ck, cv = xs  # ck, cv [B, K, S, H]
        hn = rms_norm(x, w["attn_norm"], eps)
        q, k, v = qkv_proj(hn, w, n * h, k_heads * h)  # [B, L, N H], [B, L, K H] x 2
        q = apply_rope(rms_norm(q.reshape(bsz, blk, n, h), w["q_norm"], eps), positions, inv_freq)  # [B, L, N, H]
        k = apply_rope(rms_norm(k.reshape(bsz, blk, k_heads, h), w["k_norm"], eps), positions, inv_freq)  # [B, L, K, H]
        v = v.reshape(bsz, blk, k_heads, h)  # [B, L, K, H]
        o = draft_attention(q.reshape(bsz, blk, k_heads, g, h), ck, cv, ctx_len, k, v)  # [B, L, K, G, H]
        x = x + o.reshape(bsz, blk, n * h) @ w["o"]
        x = x + mlp(rms_norm(x, w["mlp_norm"], eps), w)
        return x, None

    x, _ = jax.lax.scan(layer, x, (dparams["layers"], ctx_k, ctx_v))  # [B, L, D]
    x = rms_norm(x[:, 1:], dparams["norm"], eps)  # [B, L-1, D]
    if "lm_head" in dparams:
        return jnp.einsum("BLD,DV->BLV", x, dparams["lm_head"], preferred_element_type=jnp.float32)  # V = V_d
    return lm_head(target_params, x)  # [B, L-1, V]


def draft_to_target_ids(dparams: Params, ids: jax.Array) -> jax.Array:
    """Maps draft-vocabulary ids to target ids (the identity for a full-vocabulary drafter)."""
    d2t = dparams.get("d2t")
    return ids if d2t is None else jnp.take(d2t, ids)
