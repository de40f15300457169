"""Shared fixtures: tiny checkpoints are built once per session so JAX compiles stay few."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # helper modules beside the tests

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3", seed=1)


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from dflash_batch.decoder import load_target

    return load_target(str(tiny_llama_dir), with_tokenizer=False)


@pytest.fixture(scope="module")
def tiny_drafter(tiny_llama):
    """A random DFlash drafter (2 layers, block 8) for the tiny Llama."""
    import jax

    from dflash_batch.decoder._drafter import Drafter, DrafterConfig, init_drafter_params

    c = tiny_llama.config
    dcfg = DrafterConfig(block_size=8, mask_token_id=3, target_layer_ids=(0, 2), num_layers=2,
                         hidden_size=c.hidden_size, intermediate_size=96, num_heads=c.num_heads,
                         num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
                         rms_norm_eps=c.rms_norm_eps, vocab_size=c.vocab_size)
    return Drafter(dcfg, init_drafter_params(dcfg, jax.random.PRNGKey(0), scale=0.3))
