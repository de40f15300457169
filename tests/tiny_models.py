"""Tiny random Llama / Qwen3 checkpoints in Hugging Face format, made with transformers."""

from __future__ import annotations

from pathlib import Path

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)


def make_tiny_checkpoint(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    """Saves a randomly initialised model (safetensors + config.json) and returns its folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    kw = {**TINY, **overrides}
    tied = kw.pop("tie_word_embeddings", False)
    if family == "llama":
        cfg = LlamaConfig(**kw, rope_theta=10000.0, tie_word_embeddings=tied)
        model = LlamaForCausalLM(cfg)
    elif family == "qwen3":
        cfg = Qwen3Config(**kw, head_dim=16, rope_theta=1000000.0, tie_word_embeddings=False)
        model = Qwen3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    # Random init uses std 0.02, which makes every logit nearly equal; widen it so
    # greedy choices are decisive and comparisons meaningful.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3 if "embed" in name or "lm_head" in name else 0.15)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def random_drafter(target_config, block_size: int):
    """A random 2-layer DFlash drafter shaped for a tiny target (context from its layers 0 and 2)."""
    import jax

    from dflash_batch.decoder import Drafter, DrafterConfig
    from dflash_batch.decoder._drafter_checkpoint import init_drafter_params

    c = target_config
    dcfg = DrafterConfig(block_size=block_size, mask_token_id=3, target_layer_ids=(0, 2), num_layers=2,
                         hidden_size=c.hidden_size, intermediate_size=96, num_heads=c.num_heads,
                         num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
                         rms_norm_eps=c.rms_norm_eps, vocab_size=c.vocab_size)
    return Drafter(dcfg, init_drafter_params(dcfg, jax.random.PRNGKey(0), scale=0.3))
