"""Import a llama-architecture GGUF file into a Hugging Face checkpoint folder.

The folder holds what the rest of the project loads: ``config.json``, ``model.safetensors``
(fp32), the tokenizer files with the chat template, and ``generation_config.json``.

Weights are stored as the exact fp32 values ``gguf`` dequantizes, which is also what
transformers' own GGUF loader computes. So the imported model and a GGUF-loaded model give
bit-identical logits, and greedy outputs can be compared token for token.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

# GGUF per-block tensor name -> HF name (inside ``model.layers.{i}.``).
_BLOCK_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# llama.cpp stores llama3-style RoPE scaling as a tensor too; HF derives the same
# frequencies from config.rope_scaling, so the tensor carries nothing to keep.
_DERIVED_TENSORS = {"rope_freqs.weight"}


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None for a tensor HF derives from the config."""
    if gguf_name in _DERIVED_TENSORS:
        return None
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)  # blk, i, rest
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    raise ValueError(f"unknown llama GGUF tensor {gguf_name!r}")


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. w: [n_head*H, D] -> [n_head*H, D].

    HF llama applies RoPE to the two halves of each head (``rotate_half``); llama.cpp
    applies it to interleaved pairs. Its converter therefore reorders each head's rows
    from [x0..x(H/2-1), y0..y(H/2-1)] to [x0, y0, x1, y1, ...]. Reading the rows back
    as (pair, half) and swapping those two axes restores the HF order.
    """
    out_dim, in_dim = w.shape
    if out_dim % (2 * n_head):
        raise ValueError(f"cannot un-permute rows: {out_dim=} is not a multiple of 2*{n_head=}")
    half = out_dim // n_head // 2
    return w.reshape(n_head, half, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def import_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the HF checkpoint folder ``out_dir`` from a llama GGUF file; return ``out_dir``.

    Steps:
      1. Read config and tokenizer with transformers' GGUF support (offline).
      2. Dequantize every tensor to fp32, rename it to its HF name, un-permute q/k.
      3. Write everything into a temporary sibling folder, then rename it to ``out_dir``,
         so an interrupted import never leaves a half-written checkpoint behind.

    Raises FileExistsError if ``out_dir`` exists (also when a concurrent import won the
    rename), and ValueError for a GGUF that is not a llama model.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists():
        raise FileExistsError(f"refusing to overwrite existing {out_dir}")

    import gguf
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoTokenizer

    reader = gguf.GGUFReader(str(gguf_path))
    arch = _field_str(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: only llama GGUF files can be imported, got {arch=}")

    src_dir, src_name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(src_dir, gguf_file=src_name)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name)
    for attr, token in gguf_special_tokens(reader, tokenizer).items():
        setattr(tokenizer, attr, token)
    tied = all(t.name != "output.weight" for t in reader.tensors)
    config.architectures = ["LlamaForCausalLM"]
    config.tie_word_embeddings = tied
    config.dtype = "float32"  # transformers >= 4.56 writes this key as "dtype"

    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    tensors: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc=f"import {gguf_path.name}", unit="tensor"):
        name = hf_tensor_name(t.name)
        if name is None:
            continue
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.name.endswith(".attn_q.weight"):
            w = unpermute_rotary(w, n_q)
        elif t.name.endswith(".attn_k.weight"):
            w = unpermute_rotary(w, n_kv)
        tensors[name] = np.ascontiguousarray(w)
    _check_complete(tensors, config, gguf_path)

    # The GGUF tokenizer says "no limit"; the model's context length is the real one.
    tokenizer.model_max_length = config.max_position_embeddings

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        _write_checkpoint(tmp, config, tokenizer, tensors)
        try:
            os.rename(tmp, out_dir)  # atomic on one filesystem; fails if out_dir now exists
        except OSError as e:
            if out_dir.exists():
                raise FileExistsError(f"{out_dir} appeared during import") from e
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_checkpoint(folder: Path, config, tokenizer, tensors: dict[str, np.ndarray]) -> None:
    import safetensors.numpy
    from transformers import GenerationConfig

    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(folder)
    # "format": "pt" lets transformers' from_pretrained read the file without a warning.
    safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    # transformers 5 writes keys that older readers (the project allows >= 4.45) do not
    # know; add the older spellings beside them, with the same values.
    cfg = json.loads((folder / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    legacy = {"torch_dtype": cfg.get("dtype", "float32")}
    if rope.get("rope_type", "default") == "default" and "rope_theta" in rope:
        legacy["rope_theta"] = rope["rope_theta"]
    _update_json(folder / "config.json", legacy)
    # "TokenizersBackend" exists only in transformers 5, where PreTrainedTokenizerFast names
    # the same class. Older readers also find the chat template only in tokenizer_config.json.
    tok_legacy = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if tokenizer.chat_template:
        tok_legacy["chat_template"] = tokenizer.chat_template
    _update_json(folder / "tokenizer_config.json", tok_legacy, overwrite=True)

    os.chmod(folder, 0o755)  # mkdtemp makes it owner-only; the cache may be shared
    for p in folder.iterdir():
        os.chmod(p, 0o644)


def _update_json(path: Path, values: dict, overwrite: bool = False) -> None:
    data = json.loads(path.read_text())
    for k, v in values.items():
        if overwrite or k not in data:
            data[k] = v
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def gguf_special_tokens(reader, tokenizer) -> dict[str, str]:
    """The special tokens the GGUF's metadata names by id (``tokenizer.ggml.*_token_id``).

    transformers' GGUF reader has set them differently across versions: 5.17 made SmolLM2's
    ``<|im_start|>`` (id 1) the EOS token and left no pad token, where the file says EOS and pad
    are ``<|im_end|>`` (id 2), as 5.25 reads it. The file's ids are the model's, so they win.
    """
    keys = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
            "pad_token": "padding_token_id"}
    out = {}
    for attr, key in keys.items():
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            out[attr] = tokenizer.convert_ids_to_tokens(int(field.contents()))
    return out


def _field_str(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    return None if field is None else str(field.contents())


def _check_complete(tensors: dict[str, np.ndarray], config, gguf_path: Path) -> None:
    """Fail on a GGUF that lacks tensors the config promises, or has the wrong shapes."""
    v, d, f = config.vocab_size, config.hidden_size, config.intermediate_size
    h = getattr(config, "head_dim", None) or d // config.num_attention_heads
    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    expected = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        expected["lm_head.weight"] = (v, d)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        expected |= {
            p + "self_attn.q_proj.weight": (n_q * h, d),
            p + "self_attn.k_proj.weight": (n_kv * h, d),
            p + "self_attn.v_proj.weight": (n_kv * h, d),
            p + "self_attn.o_proj.weight": (d, n_q * h),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }
    missing = sorted(expected.keys() - tensors.keys())
    extra = sorted(tensors.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"{gguf_path}: tensors do not match the config: {missing=} {extra=}")
    bad = {k: (tensors[k].shape, s) for k, s in expected.items() if tensors[k].shape != s}
    if bad:
        raise ValueError(f"{gguf_path}: tensor shapes (got, expected) differ from the config: {bad}")
