"""Our JAX target's logits equal transformers' PyTorch model on the same checkpoint."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from dflash_batch.decoder import KVCache, TargetConfig, forward, params_from_hf, read_safetensors

torch = pytest.importorskip("torch")


def _hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()


def _ours(folder):
    cfg = TargetConfig.from_hf(json.loads((folder / "config.json").read_text()))
    return cfg, params_from_hf(cfg, read_safetensors(folder))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_prefill_and_stepwise_decode_match_transformers(family, tiny_llama_dir, tiny_qwen3_dir):
    folder = tiny_llama_dir if family == "llama" else tiny_qwen3_dir
    cfg, params = _ours(folder)
    assert cfg.family == family
    model = _hf_model(folder)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, cfg.vocab_size, size=(2, 11))
    steps = rng.integers(3, cfg.vocab_size, size=(2, 5))
    with torch.no_grad():
        full = model(torch.tensor(np.concatenate([prompt, steps], 1))).logits.numpy()

    cache = KVCache.init(cfg, 2, 32)
    logits, _, cache = forward(params, cfg, jnp.asarray(prompt), jnp.zeros((2,), jnp.int32), cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, :11], atol=2e-4, rtol=2e-4)
    for i in range(5):  # one token at a time against the cache
        p = jnp.full((2,), 11 + i)
        logits, _, cache = forward(params, cfg, jnp.asarray(steps[:, i : i + 1]), p, cache)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, 11 + i], atol=2e-4, rtol=2e-4)


def test_block_verify_pass_matches_full_sequence(tiny_qwen3_dir):
    """A multi-token pass at per-row offsets (the speculative verify shape) equals the full run."""
    cfg, params = _ours(tiny_qwen3_dir)
    model = _hf_model(tiny_qwen3_dir)
    rng = np.random.default_rng(1)
    seq = rng.integers(3, cfg.vocab_size, size=(2, 20))
    with torch.no_grad():
        full = model(torch.tensor(seq)).logits.numpy()
    cache = KVCache.init(cfg, 2, 40)
    lens = np.array([7, 12])  # rows are at different lengths, as in a real batch
    prefix = np.where(np.arange(20)[None] < lens[:, None], seq, 0)
    _, _, cache = forward(params, cfg, jnp.asarray(prefix[:, :12]), jnp.zeros((2,), jnp.int32), cache)
    block = np.stack([seq[0, 7:13], seq[1, 12:18]])
    logits, _, _ = forward(params, cfg, jnp.asarray(block), jnp.asarray(lens), cache)
    np.testing.assert_allclose(np.asarray(logits[0]), full[0, 7:13], atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(np.asarray(logits[1]), full[1, 12:18], atol=2e-4, rtol=2e-4)


def test_untied_lm_head_and_tied_embeddings_both_load(tmp_path):
    from tiny_models import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "tied", "llama", seed=3, tie_word_embeddings=True)
    cfg, params = _ours(folder)
    assert cfg.tie_word_embeddings and "lm_head" not in params
    model = _hf_model(folder)
    seq = np.arange(3, 13)[None]
    with torch.no_grad():
        ref = model(torch.tensor(seq)).logits.numpy()
    logits, _, _ = forward(params, cfg, jnp.asarray(seq), jnp.zeros((1,), jnp.int32), KVCache.init(cfg, 1, 16))
    np.testing.assert_allclose(np.asarray(logits), ref, atol=2e-4, rtol=2e-4)
