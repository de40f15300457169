"""Speculative sampling has the same distribution as AR sampling, and the test has the power
to catch a wrong acceptance rule.

Both runs sample one prompt many times with disjoint seeds. A chi-square test on a
contingency table compares the next-token distribution (the first token a speculative
step commits) and the distribution of the 3-token sequence after it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dflash_batch.decoder import Request
from dflash_batch.decoder import _speculative, _step
from oracle_proposer import ORACLE
from decoding import make_decoder

N = 1500
TEMPERATURE = 0.5  # peaked enough that 3-token sequences repeat, so the test has power


def _samples(target, mode, seeds, drafter=None, proposer=None):
    prompt = [5, 17, 33, 8, 91, 4, 60]
    dec = make_decoder(target, mode=mode, block_size=4, batch_size=16, max_new_tokens=4, prompt_buckets=(16,),
                  prefill_chunk=16, chunk_steps=8, drafter=drafter, proposer=proposer)
    reqs = [Request(id=str(s), token_ids=prompt, max_new_tokens=4, temperature=TEMPERATURE, seed=int(s))
            for s in seeds]
    return [tuple(r.token_ids[1:4]) for r in dec.generate(reqs) if len(r.token_ids) >= 4]


def _pvalue(a, b):
    """Chi-square homogeneity test of two samples over categories (rare ones pooled)."""
    cats = sorted(set(a) | set(b), key=str)
    ca = np.array([a.count(c) for c in cats])
    cb = np.array([b.count(c) for c in cats])
    common = (ca + cb) >= 10
    table = np.array([np.append(ca[common], ca[~common].sum()), np.append(cb[common], cb[~common].sum())])
    table = table[:, table.sum(0) > 0]
    return stats.chi2_contingency(table).pvalue


def wrong_accept(drafts, targets):
    """A plausible bug: an off-by-one that accepts one draft past the first mismatch."""
    matched = jnp.sum(jnp.cumprod(drafts == targets[:, :-1], axis=1), axis=1)
    return jnp.minimum(matched + 1, drafts.shape[1]).astype(jnp.int32)


@pytest.fixture(scope="module")
def ar_samples(tiny_llama):
    return _samples(tiny_llama, "ar", range(N))


@pytest.fixture
def oracle():
    _speculative.spec_decode.clear_cache()  # a patched acceptance rule must not outlive its test
    yield ORACLE
    _speculative.spec_decode.clear_cache()


@pytest.mark.slow
def test_speculative_sampling_matches_ar_distribution(tiny_llama, ar_samples, oracle):
    spec = _samples(tiny_llama, oracle["mode"], range(N, 2 * N), proposer=oracle["proposer"])
    assert len(spec) > 0.9 * N and len(ar_samples) > 0.9 * N
    assert _pvalue([s[0] for s in ar_samples], [s[0] for s in spec]) > 1e-3  # next token
    assert _pvalue(ar_samples, spec) > 1e-3  # 3-token sequences


def test_distribution_test_catches_a_wrong_acceptance_rule(tiny_llama, ar_samples, oracle, monkeypatch):
    monkeypatch.setattr(_step, "accept_length", wrong_accept)
    _speculative.spec_decode.clear_cache()
    spec = _samples(tiny_llama, oracle["mode"], range(N, 2 * N), proposer=oracle["proposer"])
    worst = min(_pvalue([s[0] for s in ar_samples], [s[0] for s in spec]), _pvalue(ar_samples, spec))
    assert worst < 1e-6


@pytest.mark.slow
def test_hybrid_sampling_matches_ar_distribution(tiny_llama, tiny_drafter, ar_samples):
    """Per-row switching between DFlash and n-gram proposals keeps sampling exact."""
    spec = _samples(tiny_llama, "hybrid", range(N, 2 * N), drafter=tiny_drafter)
    assert len(spec) > 0.9 * N
    assert _pvalue([s[0] for s in ar_samples], [s[0] for s in spec]) > 1e-3
    assert _pvalue(ar_samples, spec) > 1e-3


@pytest.mark.slow
def test_bf16_speculative_sampling_matches_bf16_ar_distribution(tiny_llama_dir, oracle):
    """The same test with weights, activations and KV cache in bf16: sampling and acceptance
    stay float32, so the rule is as exact as in float32."""
    from dflash_batch.decoder import load_target

    bf16 = load_target(str(tiny_llama_dir), dtype="bfloat16", with_tokenizer=False)
    ar = _samples(bf16, "ar", range(N))
    spec = _samples(bf16, oracle["mode"], range(N, 2 * N), proposer=oracle["proposer"])
    assert len(spec) > 0.9 * N and len(ar) > 0.9 * N
    assert _pvalue([s[0] for s in ar], [s[0] for s in spec]) > 1e-3
    assert _pvalue(ar, spec) > 1e-3
