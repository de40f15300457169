"""Speculative decoding (DFlash, n-gram) is lossless against the project's own AR decoder."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from compile_counter import count_compiles
from oracle_proposer import propose_oracle
from dflash_batch.decoder import Decoder, Request
from dflash_batch.decoder import _speculative

BUCKETS = (64,)


@pytest.fixture(scope="module")
def drafter(tiny_drafter):
    return tiny_drafter


@pytest.fixture
def oracle_mode(monkeypatch):
    monkeypatch.setitem(_speculative.PROPOSERS, "oracle", propose_oracle)
    return "oracle"


def _requests(n, vocab, seed, budgets=None, **kw):
    rng = np.random.default_rng(seed)
    return [Request(id=str(i), token_ids=list(rng.integers(3, vocab, size=int(rng.integers(2, 60)))),
                    max_new_tokens=budgets[i % len(budgets)] if budgets else 24, **kw) for i in range(n)]


@pytest.fixture(scope="module")
def ar_reference(tiny_llama):
    reqs = _requests(11, tiny_llama.config.vocab_size, seed=7, budgets=[24, 1, 5, 17, 2, 24, 9, 13])
    dec = Decoder(tiny_llama, batch_size=4, max_new_tokens=24, prompt_buckets=BUCKETS, prefill_chunk=16)
    return reqs, {r.id: r for r in dec.generate(reqs)}


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_dflash_greedy_is_token_identical_to_ar(tiny_llama, drafter, ar_reference, batch_size):
    reqs, ar = ar_reference
    dec = Decoder(tiny_llama, mode="dflash", drafter=drafter, block_size=8, batch_size=batch_size,
                  max_new_tokens=24, prompt_buckets=BUCKETS, prefill_chunk=16)
    out = {r.id: r for r in dec.generate(reqs)}
    assert {k: r.token_ids for k, r in out.items()} == {k: r.token_ids for k, r in ar.items()}
    assert {k: r.finish_reason for k, r in out.items()} == {k: r.finish_reason for k, r in ar.items()}
    assert any(r.finish_reason == "eos" for r in ar.values())  # EOS is exercised


def test_ngram_greedy_is_token_identical_to_ar(tiny_llama, ar_reference):
    reqs, ar = ar_reference
    dec = Decoder(tiny_llama, mode="ngram", block_size=4, batch_size=3, max_new_tokens=24, prompt_buckets=BUCKETS,
                  prefill_chunk=16)
    assert {r.id: r.token_ids for r in dec.generate(reqs)} == {k: r.token_ids for k, r in ar.items()}


def test_perfect_drafter_reaches_tau_equal_block_size(tiny_llama, ar_reference, oracle_mode):
    """Every step commits all L tokens when drafts are the target's greedy choices, and EOS
    inside a verified block cuts the row exactly where AR stops."""
    reqs, ar = ar_reference
    block = 5
    dec = Decoder(tiny_llama, mode=oracle_mode, block_size=block, batch_size=3, max_new_tokens=24,
                  prompt_buckets=BUCKETS, prefill_chunk=16)
    out = {r.id: r for r in dec.generate(reqs)}
    assert {k: r.token_ids for k, r in out.items()} == {k: r.token_ids for k, r in ar.items()}
    for r in out.values():
        steps = r.decode_steps
        assert steps == -(-(r.completion_tokens - 1) // block)  # ceil: only the last step may be short
        if steps:
            assert r.accepted_per_step[block - 1] >= steps - 1
            assert r.draft_tokens_accepted == r.completion_tokens - 1 - steps
    long_rows = [r for r in out.values() if r.completion_tokens == 21]  # 20 = 4 full blocks after prefill
    assert all(r.tau == block for r in long_rows)


def test_ngram_proposes_the_continuation_of_the_latest_match():
    tokens = jnp.asarray([[5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6, 0, 0]])
    # The row's newest token is at position 11 ("... 5 6"): the latest earlier "5 6" ends at 6.
    drafts = _speculative.ngram_propose(tokens, jnp.asarray([11]), 3)
    assert drafts.tolist() == [[7, 1, 2]]


def test_no_recompilation_after_warmup(tiny_llama, drafter):
    dec = Decoder(tiny_llama, mode="dflash", drafter=drafter, block_size=6, batch_size=3, max_new_tokens=24,
                  prompt_buckets=BUCKETS, prefill_chunk=16)
    dec.warmup(64)
    reqs = _requests(7, tiny_llama.config.vocab_size, seed=3, budgets=[3, 24, 11], temperature=0.8)
    with count_compiles() as compiles:
        assert len(list(dec.generate(reqs))) == 7
    assert compiles() == 0


def test_stats_count_drafted_and_accepted_tokens(tiny_llama, drafter, ar_reference):
    reqs, _ = ar_reference
    dec = Decoder(tiny_llama, mode="dflash", drafter=drafter, block_size=8, batch_size=3, max_new_tokens=24,
                  prompt_buckets=BUCKETS, prefill_chunk=16)
    for r in dec.generate(reqs):
        assert r.draft_tokens_proposed == 7 * r.decode_steps
        committed = int((r.accepted_per_step * np.arange(1, 9)).sum())
        assert committed == r.completion_tokens - 1  # the prefill's token is not a decode step's
        assert r.draft_tokens_accepted == committed - r.decode_steps
