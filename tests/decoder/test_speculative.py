"""Speculative decoding (DFlash, n-gram) is lossless against the project's own AR decoder."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compile_counter import count_compiles
from oracle_proposer import ORACLE, propose_oracle
from dflash_batch.decoder import Request
from dflash_batch.decoder import _acceptance, _proposers
from decoding import make_decoder

BUCKETS = (64,)


@pytest.fixture(scope="module")
def drafter(tiny_drafter):
    return tiny_drafter


def _requests(n, vocab, seed, budgets=None, **kw):
    rng = np.random.default_rng(seed)
    return [Request(id=str(i), token_ids=list(rng.integers(3, vocab, size=int(rng.integers(2, 60)))),
                    max_new_tokens=budgets[i % len(budgets)] if budgets else 24, **kw) for i in range(n)]


@pytest.fixture(scope="module")
def ar_reference(tiny_llama):
    reqs = _requests(11, tiny_llama.config.vocab_size, seed=7, budgets=[24, 1, 5, 17, 2, 24, 9, 13])
    dec = make_decoder(tiny_llama, batch_size=4, max_new_tokens=24, prompt_buckets=BUCKETS, prefill_chunk=16)
    return reqs, {r.id: r for r in dec.generate(reqs)}


@pytest.mark.parametrize("mode, batch_size", [("dflash", 1), ("dflash", 3), ("dflash", 8), ("hybrid", 1),
                                              ("hybrid", 3)])
def test_speculative_greedy_is_token_identical_to_ar(tiny_llama, drafter, ar_reference, mode, batch_size):
    reqs, ar = ar_reference
    dec = make_decoder(tiny_llama, mode=mode, drafter=drafter, block_size=8, batch_size=batch_size,
                  max_new_tokens=24, prompt_buckets=BUCKETS, prefill_chunk=16)
    out = {r.id: r for r in dec.generate(reqs)}
    assert {k: r.token_ids for k, r in out.items()} == {k: r.token_ids for k, r in ar.items()}
    assert {k: r.finish_reason for k, r in out.items()} == {k: r.finish_reason for k, r in ar.items()}
    assert any(r.finish_reason == "eos" for r in ar.values())  # EOS is exercised
    if mode == "hybrid":  # every step verified one of the two sources
        report = dec.block_report()["64"]["hybrid"]
        assert report["steps_ngram"] + report["steps_dflash"] == sum(r.decode_steps for r in out.values())


def test_ngram_greedy_is_token_identical_to_ar(tiny_llama, ar_reference):
    reqs, ar = ar_reference
    dec = make_decoder(tiny_llama, mode="ngram", block_size=4, batch_size=3, max_new_tokens=24, prompt_buckets=BUCKETS,
                  prefill_chunk=16)
    assert {r.id: r.token_ids for r in dec.generate(reqs)} == {k: r.token_ids for k, r in ar.items()}


def test_perfect_drafter_reaches_tau_equal_block_size(tiny_llama, ar_reference):
    """Every step commits all L tokens when drafts are the target's greedy choices, and EOS
    inside a verified block cuts the row exactly where AR stops."""
    reqs, ar = ar_reference
    block = 5
    dec = make_decoder(tiny_llama, **ORACLE, block_size=block, batch_size=3, max_new_tokens=24,
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
    drafts, match = _proposers.ngram_match(tokens, jnp.asarray([11]), 3)
    assert drafts.tolist() == [[7, 1, 2]] and match.tolist() == [2]


@pytest.mark.slow
@pytest.mark.parametrize("mode, block_size", [("dflash", 6), ("hybrid", "auto")])
def test_no_recompilation_after_warmup(tiny_llama, drafter, mode, block_size):
    dec = make_decoder(tiny_llama, mode=mode, drafter=drafter, block_size=block_size, batch_size=3, max_new_tokens=24,
                  prompt_buckets=BUCKETS, prefill_chunk=16)
    dec.warmup(64)
    reqs = _requests(7, tiny_llama.config.vocab_size, seed=3, budgets=[3, 24, 11], temperature=0.8)
    with count_compiles() as compiles:
        assert len(list(dec.generate(reqs))) == 7
    assert compiles() == 0


@pytest.mark.slow
def test_one_host_round_trip_per_decode_call(tiny_llama, drafter, monkeypatch):
    """A decode call reads back what the policy and ``harvest`` need in one ``device_get``, and
    nothing implicitly; ``harvest`` adds one more only when rows finished. More would stall the
    device once per call."""
    dec = make_decoder(tiny_llama, mode="hybrid", drafter=drafter, block_size="auto", batch_size=3,
                       max_new_tokens=24, prompt_buckets=BUCKETS, prefill_chunk=16)
    dec.warmup(64)
    reqs = _requests(7, tiny_llama.config.vocab_size, seed=3, budgets=[3, 24, 11])
    gets, device_get = [], jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda tree: gets.append(1) or device_get(tree))
    run, calls, finished = dec.start(reqs, bucket=64), 0, 0
    # On an accelerator the guard also makes any implicit read-back raise (on a CPU it cannot).
    with jax.transfer_guard_device_to_host("disallow"):
        while run.refill() or run.busy:
            before = len(gets)
            run.decode()
            assert len(gets) - before == 1
            before = len(gets)
            done = run.harvest()
            assert len(gets) - before == (1 if done else 0)
            calls, finished = calls + 1, finished + len(done)
    assert finished == 7 and calls >= 3


def test_stats_count_drafted_and_accepted_tokens(tiny_llama, drafter, ar_reference):
    reqs, _ = ar_reference
    dec = make_decoder(tiny_llama, mode="dflash", drafter=drafter, block_size=8, batch_size=3, max_new_tokens=24,
                  prompt_buckets=BUCKETS, prefill_chunk=16)
    for r in dec.generate(reqs):
        assert r.draft_tokens_proposed == 7 * r.decode_steps
        committed = int((r.accepted_per_step * np.arange(1, 9)).sum())
        assert committed == r.completion_tokens - 1  # the prefill's token is not a decode step's
        assert r.draft_tokens_accepted == committed - r.decode_steps


@dataclasses.dataclass(frozen=True)
class PerfectLookup:
    """In the n-gram's place: the oracle's drafts, always as a 3-token match."""

    def __call__(self, params, cfg, drafter, s, block):
        drafts = propose_oracle(params, cfg, drafter, s, block)
        return _acceptance.Proposal(ngram=drafts, match=jnp.full((s.batch,), 3, jnp.int32))


def test_hybrid_verifies_the_source_that_accepts_more(tiny_llama, drafter):
    """A random drafter against a perfect proposal in the n-gram's place (always a
    3-token match): the chooser learns to verify the better source, and tau follows it."""
    reqs = _requests(9, tiny_llama.config.vocab_size, seed=5, budgets=[24])
    ar = {r.id: r.token_ids for r in make_decoder(tiny_llama, batch_size=3, max_new_tokens=24, prompt_buckets=BUCKETS,
                                             prefill_chunk=16).generate(reqs)}

    dec = make_decoder(tiny_llama, mode="hybrid", drafter=drafter, block_size=6, batch_size=3, max_new_tokens=24,
                       prompt_buckets=BUCKETS, prefill_chunk=16,
                       proposer=_proposers.HybridProposer(ngram=PerfectLookup()))
    out = list(dec.generate(reqs))
    assert {r.id: r.token_ids for r in out} == ar
    report = dec.block_report()["64"]["hybrid"]
    assert report["steps_ngram"] > 4 * report["steps_dflash"], report
    assert report["ngram_accepted_by_match_length"]["3"] > 4.0
    steps = sum(r.decode_steps for r in out)
    assert sum(r.completion_tokens - 1 for r in out) / steps > 4.0


def test_proposal_stats_count_only_the_committed_evidence():
    st = _acceptance.ProposalStats.init(3)
    prop = _acceptance.Proposal(
        ngram=jnp.asarray([[7, 8, 9], [1, 2, 3]]), match=jnp.asarray([2, 1]),
        dflash=jnp.asarray([[7, 0, 0], [1, 2, 3]]), p_top=jnp.asarray([[0.5, 0.5, 0.5], [1.0, 1.0, 0.5]]),
        use_ngram=jnp.asarray([False, True]))
    y = jnp.asarray([[7, 8, 5, 4], [1, 2, 3, 6]])
    # Row 0 verified DFlash: 1 accepted, so the target's tokens are known up to draft 2 (7 8);
    # the n-gram's drafts 1-2 agree with them, draft 3 cannot be judged. Row 1 verified the
    # n-gram: all 3 accepted.
    new = _acceptance.learn(st, prop, y, jnp.asarray([1, 3]), jnp.asarray([True, True]), verified=True)
    tries, hits = np.asarray(new.ngram_tries - st.ngram_tries), np.asarray(new.ngram_hits - st.ngram_hits)
    assert tries.tolist() == [[0, 0, 0], [1, 1, 1], [1, 1, 0], [0, 0, 0]]
    assert hits.tolist() == [[0, 0, 0], [1, 1, 1], [1, 1, 0], [0, 0, 0]]
    # DFlash: row 0 (verified: its whole block counts) 1 of 0.5 + 0.25 + 0.125 expected;
    # row 1 (judged up to its 4 committed tokens) 3 of 1 + 1 + 0.5.
    assert float(new.dflash_acc - st.dflash_acc) == 1 + 3
    assert float(new.dflash_pred - st.dflash_pred) == pytest.approx(0.875 + 2.5)
    assert (int(new.chose_ngram), int(new.chose_dflash), int(new.gated)) == (1, 1, 0)
    # A gated step (a 1-token AR pass): only draft 1 can be judged, and nothing was verified.
    gated = _acceptance.learn(st, prop, y[:, :1], jnp.asarray([0, 0]), jnp.asarray([True, False]),
                               verified=False)
    assert np.asarray(gated.ngram_tries - st.ngram_tries)[2].tolist() == [1, 0, 0]
    assert np.asarray(gated.ngram_hits - st.ngram_hits)[2].tolist() == [1, 0, 0]
    assert float(gated.ngram_tries.sum() - st.ngram_tries.sum()) == 1  # row 1 is idle
    assert (int(gated.chose_ngram), int(gated.chose_dflash), int(gated.gated)) == (0, 0, 1)
    assert float(gated.dflash_pred - st.dflash_pred) == pytest.approx(0.5)


def test_proposal_promise_is_the_product_of_learnt_rates():
    st = _acceptance.ProposalStats.init(3)
    st = st.replace(ngram_hits=st.ngram_hits.at[3].set(jnp.asarray([9.0, 5.0, 1.0])),
                    ngram_tries=st.ngram_tries.at[3].set(jnp.asarray([10.0, 10.0, 10.0])))
    promise = st.ngram_promise(jnp.asarray([3, 1]), 3)
    assert np.allclose(promise, [0.9 + 0.45 + 0.045, 3.0])  # match length 1: still the optimistic prior
    st = st.replace(dflash_acc=jnp.float32(1), dflash_pred=jnp.float32(2))
    assert np.allclose(st.dflash_promise(jnp.asarray([[0.8, 0.5, 1.0]])), [(0.8 + 0.4 + 0.4) / 2])


def test_every_mode_reads_as_much_cache_per_step_as_ar(tiny_llama, drafter):
    """A speculative batch's KV cache is no longer than AR's (the padded prompt plus the
    completion): a verified block past the end drops its rows there, so no slack is kept."""
    lengths = {}
    for mode, block in [("ar", 1), ("ngram", "auto"), ("dflash", 8), ("hybrid", "auto")]:
        dec = make_decoder(tiny_llama, mode=mode, drafter=drafter, block_size=block, batch_size=3, max_new_tokens=24,
                      prompt_buckets=BUCKETS, prefill_chunk=16)
        lengths[mode] = dec.engine(64).phases.init_state().cache.k.shape[3]
    assert lengths == {"ar": 64 + 24, "ngram": 64 + 24, "dflash": 64 + 24, "hybrid": 64 + 24}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dflash", "hybrid"])
def test_ar_calls_skip_the_drafter_and_later_drafts_stay_lossless(tiny_llama, drafter, ar_reference, mode,
                                                                 monkeypatch):
    """An L = 1 call of a drafting mode leaves the drafter's context alone (its upkeep is
    what made such a call dearer than AR); the next speculative call drafts from a context
    with a gap, extends it by exactly what it commits, and the output is still AR's."""
    reqs, ar = ar_reference
    dec = make_decoder(tiny_llama, mode=mode, drafter=drafter, block_size="auto", batch_size=3, max_new_tokens=24,
                  prompt_buckets=BUCKETS, prefill_chunk=16)
    engine = dec.engine(64)
    engine.warmup()
    script = itertools.cycle([1, 8, 1, 1, 4])
    monkeypatch.setattr(engine.policy, "choose", lambda: (next(script), False))
    calls = []
    decode = engine.phases.decode

    def spy(s, *, block, **kw):
        before = jax.device_get((s.pos, s.extra.ctx_len, s.extra.ctx_k))
        s, ran = decode(s, block=block, **kw)
        calls.append((block, before, jax.device_get((s.pos, s.extra.ctx_len, s.extra.ctx_k))))
        return s, ran

    monkeypatch.setattr(engine.phases, "decode", spy)
    out = {r.id: r.token_ids for r in dec.generate(reqs)}
    assert out == {k: r.token_ids for k, r in ar.items()}
    assert {b for b, _, _ in calls} == {1, 4, 8}
    for block, (pos0, len0, k0), (pos1, len1, k1) in calls:
        assert (len0 <= pos0).all() and (len1 <= pos1).all()
        if block == 1:
            assert (pos1 > pos0).any()
            np.testing.assert_array_equal(len1, len0)
            np.testing.assert_array_equal(k1, k0)
        else:
            np.testing.assert_array_equal(len1 - len0, pos1 - pos0)
    assert any(b > 1 and (len0 < pos0).any() for b, (pos0, len0, _), _ in calls)  # drafted across a gap
