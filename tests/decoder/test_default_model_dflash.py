"""DFlash and hybrid greedy on the default model (SmolLM2-135M-Instruct) are token-identical to AR.

The drafter is the shipped one when it exists, else a randomly initialised drafter of the
default model's shapes (a learned mask embedding, since SmolLM2 has no spare token): either
way acceptance only changes speed, never tokens. Mixed prompt lengths and budgets, batch 3,
and rows that end on EOS inside a verified block.
"""

from __future__ import annotations

import jax
import pytest

from dflash_batch.decoder import Request, load_drafter, load_target, render_messages
from dflash_batch.decoder._drafter_checkpoint import Drafter, init_drafter_params
from dflash_batch.decoder._drafter_config import DrafterConfig, default_target_layer_ids
from dflash_batch.decoder._registry import resolve_drafter_dir
from dflash_batch.jobs._datasets import aclsum_abstracts
from dflash_batch.decoder import summarize_messages
from decoding import make_decoder

pytestmark = [pytest.mark.slow, pytest.mark.minutes]
MODEL = "smollm2-135m-instruct"


def _drafter(cfg):
    try:
        return load_drafter(resolve_drafter_dir("default", MODEL))
    except ValueError:
        layer_ids = default_target_layer_ids(cfg.num_layers, 2)
        dcfg = DrafterConfig(block_size=8, mask_token_id=0, target_layer_ids=layer_ids,
                             num_layers=1, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                             num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                             rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, vocab_size=cfg.vocab_size,
                             mask_embedding=True)
        return Drafter(dcfg, init_drafter_params(dcfg, jax.random.PRNGKey(0)))


KW = dict(batch_size=3, max_new_tokens=96, prompt_buckets=(512,))


@pytest.fixture(scope="module")
def ar_run():
    target = load_target(MODEL)
    docs = aclsum_abstracts("test")[:4]
    reqs = [Request(id=d["id"], token_ids=render_messages(target.tokenizer, summarize_messages(d["document"])),
                    max_new_tokens=m) for d, m in zip(docs, (96, 40, 96, 17))]
    ar = {r.id: r for r in make_decoder(target, **KW).generate(reqs)}
    assert any(r.finish_reason == "eos" for r in ar.values())
    return target, reqs, ar


@pytest.mark.parametrize("mode", ["dflash", "hybrid"])
def test_speculative_greedy_equals_ar_on_the_default_model(ar_run, mode):
    target, reqs, ar = ar_run
    spec = {r.id: r for r in make_decoder(target, mode=mode, drafter=_drafter(target.config), block_size=8,
                                     **KW).generate(reqs)}
    for k, r in ar.items():
        assert spec[k].token_ids == r.token_ids, k
        assert spec[k].finish_reason == r.finish_reason, k
