"""The full decoder with the Pallas kernels (interpret mode) in its attention gives the same
greedy tokens and acceptance as with the jnp references, on a tiny model; and the drafter's
logits, which greedy tokens alone cannot see, agree as well.

The implementation is read when a function is traced, so jit caches are cleared around the
forced run; a spy on the kernel entry point proves the kernels were really in the program.

Before a kernel chosen by context enters the decoder's program it checks itself against its
reference (kernels._selfcheck): a wrong kernel, injected here, is replaced by the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dflash_batch.decoder import Request
from dflash_batch.decoder import _drafter
from dflash_batch.kernels import KernelFallbackWarning, _block_attention, attention_report, \
    reference_draft_attention, reference_verify_attention, self_check, use_attention_impl, verify_attention
from decoding import make_decoder
from fresh_process import fresh_kernel_checks


@pytest.fixture(scope="module")
def drafter(tiny_drafter):
    return tiny_drafter


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts kernel traces by causal flag (True = verify, False = draft); clears jit caches."""
    calls = {True: 0, False: 0}
    real = _block_attention.run_kernel

    def spy(*args, causal, **kwargs):
        calls[causal] += 1
        return real(*args, causal=causal, **kwargs)

    monkeypatch.setattr(_block_attention, "run_kernel", spy)
    jax.clear_caches()
    with fresh_kernel_checks():
        yield calls
    jax.clear_caches()


@pytest.fixture
def wrong_verify_kernel(monkeypatch):
    """A verify kernel that is off by 0.01 everywhere (as a bad lowering might be); counts its calls."""
    calls = []
    real = _block_attention.run_kernel

    def wrong(*args, causal, **kwargs):
        out = real(*args, causal=causal, **kwargs)
        if causal:
            calls.append(1)
            out = out + jnp.asarray(0.01, out.dtype)
        return out

    monkeypatch.setattr(_block_attention, "run_kernel", wrong)
    jax.clear_caches()
    with fresh_kernel_checks():
        yield calls
    jax.clear_caches()


def _generate(model, drafter, reqs):
    dec = make_decoder(model, mode="dflash", drafter=drafter, block_size=8, batch_size=3, max_new_tokens=12,
                  prompt_buckets=(48,), prefill_chunk=16)
    return {r.id: (r.token_ids, r.accepted_per_step.tolist()) for r in dec.generate(reqs)}


@pytest.mark.slow
def test_dflash_greedy_tokens_are_the_same_with_the_kernels(tiny_llama, drafter, kernel_calls):
    """Prefill chunks, verify blocks and drafts all go through the kernels. Tokens are the
    target's either way (DFlash is lossless); acceptance also depends on the drafter."""
    rng = np.random.default_rng(11)
    reqs = [Request(id=str(i), token_ids=list(rng.integers(3, tiny_llama.config.vocab_size, size=n)),
                    max_new_tokens=m) for i, (n, m) in enumerate([(5, 12), (40, 9), (17, 12), (2, 4)])]
    with use_attention_impl("reference"):
        want = _generate(tiny_llama, drafter, reqs)
    assert kernel_calls == {True: 0, False: 0}
    jax.clear_caches()
    with use_attention_impl("interpret"):
        got = _generate(tiny_llama, drafter, reqs)
    assert kernel_calls[True] and kernel_calls[False]  # both kernels were in the traced programs
    assert got == want
    assert attention_report() == {"draft_attention": {"impl": "interpret", "fallback": None},
                                  "verify_attention": {"impl": "interpret", "fallback": None}}
    assert all(len(tokens) > 1 for tokens, _ in want.values())


@pytest.mark.slow
def test_draft_logits_are_the_same_with_the_kernel(tiny_llama, drafter, kernel_calls):
    dcfg, dparams = drafter.config, drafter.params
    c = tiny_llama.config
    b, s, blk = 3, 21, dcfg.block_size
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    ctx_k, ctx_v = (jax.random.normal(kk, (dcfg.num_layers, b, c.num_kv_heads, s, c.head_dim)) for kk in keys[:2])
    tokens = jnp.full((b, blk), dcfg.mask_token_id).at[:, 0].set(jnp.asarray([7, 8, 9]))
    ctx_len = jnp.asarray([0, 13, 21])
    args = (dparams, dcfg, tiny_llama.params, c, tokens, ctx_len, ctx_k, ctx_v, ctx_len)
    with use_attention_impl("reference"):
        want = _drafter.draft_block(*args)
    with use_attention_impl("interpret"):
        got = _drafter.draft_block(*args)
    assert kernel_calls[False]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4, rtol=2e-4)


def _requests(tiny_llama):
    rng = np.random.default_rng(5)
    return [Request(id=str(i), token_ids=list(rng.integers(3, tiny_llama.config.vocab_size, size=n)),
                    max_new_tokens=8) for i, n in enumerate([6, 30])]


@pytest.mark.slow
def test_a_wrong_kernel_fails_its_check_and_the_reference_decodes(tiny_llama, drafter, wrong_verify_kernel):
    reqs = _requests(tiny_llama)
    with use_attention_impl("reference"):
        want = _generate(tiny_llama, drafter, reqs)
    jax.clear_caches()
    with use_attention_impl("interpret"), pytest.warns(KernelFallbackWarning, match="verify_attention: the "
                                                       "interpret kernel self-check on cpu.* FAILED"):
        got = _generate(tiny_llama, drafter, reqs)
    assert got == want
    assert len(wrong_verify_kernel) == 1  # the check's float32 case ran it (and stopped); the decoder never did
    report = attention_report()
    assert report["draft_attention"] == {"impl": "interpret", "fallback": None}
    assert report["verify_attention"]["impl"] == "reference"
    assert "float32 output differs from the reference beyond atol=rtol=0.0002" in report["verify_attention"]["fallback"]


def test_an_explicit_kernel_is_not_replaced(wrong_verify_kernel):
    """Kernel tests ask for the kernel by argument: they must get it, wrong or not."""
    from dflash_batch.kernels._selfcheck import _case

    args = _case("verify_attention", jnp.float32)
    got = verify_attention(*args, impl="interpret")
    want = reference_verify_attention(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want) + 0.01, atol=1e-5)
    assert attention_report() == {}  # explicit calls are not the decoder's


def test_a_kernel_that_raises_fails_its_check(monkeypatch):
    def broken(*args, **kwargs):
        raise NotImplementedError("Mosaic cannot lower this")

    monkeypatch.setattr(_block_attention, "run_kernel", broken)
    with fresh_kernel_checks(), pytest.warns(KernelFallbackWarning):
        check = self_check("draft_attention", "interpret", reference_draft_attention)
    assert not check.passed and "the kernel raised NotImplementedError: Mosaic cannot lower this" in check.detail
