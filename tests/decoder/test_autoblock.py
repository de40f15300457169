"""Automatic block length: measured costs and observed acceptance pick the fastest L, AR included."""

from __future__ import annotations

import numpy as np
import pytest

from dflash_batch.decoder import Request, _state
from dflash_batch.decoder._autoblock import BlockPolicy
from oracle_proposer import ORACLE
from decoding import make_decoder


def test_acceptance_is_counted_per_draft_position():
    policy = BlockPolicy((1, 4))
    # Four steps at L=4: two committed 1 token, one committed 2, one committed all 4.
    policy.observe(4, np.array([2, 1, 0, 1]))
    assert np.allclose(policy.acceptance()[1:], [0.5, 0.25, 0.25])
    assert policy.expected_tokens(4) == 2.0
    policy.observe(2, np.array([0, 4]))  # four more steps judge q_1 only
    assert np.allclose(policy.acceptance()[1:], [6 / 8, 0.25, 0.25])


def test_tries_upward_from_the_smallest_block_then_picks_best_throughput():
    policy = BlockPolicy((1, 2, 4), costs={1: 1.0, 2: 1.2, 4: 1.5})
    assert policy.choose() == (2, True)  # nothing observed yet: the cheapest trial first
    policy.observe(2, np.array([0, 10]))  # the one draft always accepted: L=4 might pay more
    assert policy.choose() == (4, True)
    policy.observe(4, np.array([0, 0, 0, 10]))  # every draft accepted: E = 4 tokens per step
    assert policy.choose() == (4, False)
    bad = BlockPolicy((1, 2, 4), costs={1: 1.0, 2: 1.2, 4: 1.5})
    assert bad.choose() == (2, True)
    bad.observe(2, np.array([10, 0]))  # nothing accepted: speculation only costs, larger L too
    assert bad.choose() == (1, False)
    report = bad.report()
    assert report["decode_calls_by_block"] == {"1": 1, "2": 1} and set(report["step_ms"]) == {"1", "2", "4"}


def test_rechecks_the_runner_up_every_so_many_calls():
    policy = BlockPolicy((1, 4), recheck_every=4, costs={1: 1.0, 4: 3.0})
    policy.observe(4, np.array([5, 0, 0, 0]))
    assert [policy.choose() for _ in range(8)] == [(1, False)] * 3 + [(4, True)] + [(1, False)] * 3 + [(4, True)]
    good = BlockPolicy((1, 2, 4), recheck_every=2, costs={1: 1.0, 2: 1.2, 4: 1.5})
    good.observe(4, np.array([0, 0, 0, 5]))
    assert [block for block, _ in (good.choose() for _ in range(4))] == [4, 2, 4, 2]  # AR has no acceptance to recheck
    single = BlockPolicy((4,), recheck_every=1, costs={4: 1.0})
    assert [single.choose() for _ in range(3)] == [(4, False)] * 3  # a fixed L never tries another


@pytest.mark.slow
def test_auto_block_size_is_lossless_and_reports_its_choice(tiny_llama, monkeypatch):
    # Candidates 1, 2, 4 and 8: trials go upward through more than one speculative length, and
    # the oracle's 16-token block (15 target passes per draft) is not compiled.
    monkeypatch.setattr(_state, "PROPOSER_BLOCK", 8)
    rng = np.random.default_rng(11)
    reqs = [Request(id=str(i), token_ids=list(rng.integers(3, 128, size=int(rng.integers(2, 40)))),
                    max_new_tokens=int(rng.integers(1, 24))) for i in range(8)]
    kw = dict(batch_size=3, max_new_tokens=24, prompt_buckets=(64,), prefill_chunk=16)
    ar = {r.id: r.token_ids for r in make_decoder(tiny_llama, **kw).generate(reqs)}
    auto = make_decoder(tiny_llama, **ORACLE, block_size="auto", **kw)
    assert auto.blocks == (1, 2, 4, 8)
    engine = auto.engine(64)
    engine.warmup()
    # The timed costs are this machine's (and a shared machine's at that); the choices below are
    # made from fixed ones, where a perfect drafter's longer blocks pay.
    engine.policy.costs.update({1: 1.0, 2: 1.1, 4: 1.2, 8: 1.4})
    engine.policy.gated_costs.update({2: 1.0, 4: 1.0, 8: 1.0})  # a gated step: an AR step
    decode, probes = engine.phases.decode, []

    choose = engine.policy.choose

    def logged_choice():
        block, trial = choose()
        probes.append(trial)
        return block, trial

    def logged(s, *, max_steps, **kw):
        if probes[-1]:
            steps.append(int(max_steps))
        return decode(s, max_steps=max_steps, **kw)

    engine.policy.choose, engine.phases.decode, steps = logged_choice, logged, []
    assert {r.id: r.token_ids for r in auto.generate(reqs)} == ar
    # A probe sees at least 16 row-steps: 6 steps at batch 3 (at batch 1, 4 steps judged q_1 on 4 tokens).
    assert any(probes) and set(steps) == {6}
    report = auto.block_report()["64"]
    assert set(report["step_ms"]) == {"1", "2", "4", "8"}
    # A perfect drafter: every draft is accepted, except where a row's budget or EOS cut
    # the step short (counted as a rejection, which only makes the policy conservative).
    assert report["acceptance_q"][0] > 0.8
    assert sum(report["decode_calls_by_block"].values()) == len(probes)


def test_trials_stop_where_acceptance_rules_larger_blocks_out():
    # Large passes are dear (a CPU at batch 16).
    policy = BlockPolicy((1, 2, 4, 8, 16), costs={1: 1.0, 2: 1.1, 4: 1.3, 8: 2.0, 16: 6.0})
    assert policy.choose() == (2, True)
    policy.observe(2, np.array([2, 2]))  # q_1 = 1/2
    # Optimistically q_2, q_3 = 1/2 too: L=4 might commit 2.5 per 1.3 s, better than L=2's 1.5 / 1.1.
    assert policy.choose() == (4, True)
    policy.observe(4, np.array([4, 2, 1, 1]))  # q_1..q_3 = 1/2, 1/4, 1/8 over all the steps seen
    # L=8 at best adds 4 x 1/8 tokens for 0.7 s more: no better than L=4, so it is never tried.
    assert policy.throughput(8, optimistic=True) < policy.throughput(4)
    assert [policy.choose() for _ in range(5)] == [(4, False)] * 5
    assert 8 not in policy.calls and 16 not in policy.calls


def test_no_trial_where_no_block_could_pay():
    # A 2-token pass costs more than twice a 1-token pass: even a perfect drafter cannot win.
    policy = BlockPolicy((1, 2, 4), costs={1: 1.0, 2: 2.1, 4: 4.5})
    assert [policy.choose() for _ in range(3)] == [(1, False)] * 3


def test_a_near_tie_goes_to_ar():
    policy = BlockPolicy((1, 2), costs={1: 1.0, 2: 1.2}, margin=0.10)
    policy.observe(2, np.array([70, 30]))  # E = 1.3 tokens per step: 1.08x AR's throughput
    assert policy.choose() == (1, False)
    policy.observe(2, np.array([0, 200]))  # now E = 1.77: 1.47x
    assert policy.choose() == (2, False)


def test_warmup_costs_are_same_round_ratios_to_ar():
    policy = BlockPolicy((1, 2, 4))
    # Round 2 was a slow spell for every length; round 3 only for AR's call.
    policy.set_costs({1: [1.0, 2.0, 3.0], 2: [1.2, 2.4, 1.2], 4: [1.5, 3.0, 1.5]},
                     gated={2: [1.1, 2.2, 1.1], 4: [1.3, 2.6, 1.3]})
    assert policy.costs == {1: 1.0, 2: pytest.approx(1.2), 4: pytest.approx(1.5)}
    assert policy.gated_costs == {2: pytest.approx(1.1), 4: pytest.approx(1.3)}
    # Ratios that disagree: the choice takes the dear side (the upper quartile), not the median.
    spread = BlockPolicy((1, 2))
    spread.set_costs({1: [1.0] * 5, 2: [1.3, 1.5, 1.2, 1.4, 1.6]})
    assert spread.costs[2] == pytest.approx(1.5)
    # A length without AR beside it, or with a call that ran no step, keeps its best call.
    lone = BlockPolicy((2, 4))
    lone.set_costs({2: [3.0, 2.0], 4: []})
    assert lone.costs == {2: 2.0}


def test_gated_steps_are_no_evidence_of_acceptance_but_count_in_the_expectation():
    policy = BlockPolicy((1, 4), costs={1: 1.0, 4: 2.0})
    assert policy.gate(4) == 2.0 and policy.gate(1) == 0.0
    # 10 row-steps at L=4: 6 gated (one token each), 4 verified that committed all 4 tokens.
    policy.observe(4, np.array([6, 0, 0, 4]), gated=6)
    assert np.allclose(policy.acceptance()[1:], [1.0, 1.0, 1.0])  # from the 4 verified steps
    assert policy.expected_tokens(4) == pytest.approx(1 + 0.4 * 3)  # 2.2 tokens per step
    assert policy.report()["gated_fraction_by_block"] == {"4": 0.6}
    # A call at L=4 costs its pass on the verified steps and a gated step (timed at warmup) on the others.
    policy.gated_costs[4] = 1.25
    assert policy.cost(4) == pytest.approx(0.4 * 2.0 + 0.6 * 1.25)
    assert policy.gate(4) == pytest.approx(2.0 / 1.25)  # verify where 1 + promise outgrows 1.6 AR steps
    assert BlockPolicy((4,), costs={4: 2.0}).gate(4) == 0.0  # a fixed L: nothing to fall back on


@pytest.mark.slow
@pytest.mark.parametrize("gate, all_gated", [(1e6, True), (0.0, False)])
def test_the_per_step_gate_runs_steps_as_ar_where_proposals_cannot_pay(tiny_llama, monkeypatch, gate, all_gated):
    """A gate no proposal can clear turns every step of a speculative call into an AR step
    (one token, nothing verified); gate 0 verifies every step. Tokens equal AR's either way."""
    monkeypatch.setattr(BlockPolicy, "gate", lambda self, block: gate)
    monkeypatch.setattr(_state, "PROPOSER_BLOCK", 4)  # candidates 1, 2, 4
    rng = np.random.default_rng(5)
    reqs = [Request(id=str(i), token_ids=list(rng.integers(3, 128, size=int(rng.integers(2, 40)))),
                    max_new_tokens=16, temperature=0.7 if i % 2 else 0.0, seed=i) for i in range(6)]
    kw = dict(batch_size=3, max_new_tokens=16, prompt_buckets=(64,), prefill_chunk=16)
    ar = {r.id: r.token_ids for r in make_decoder(tiny_llama, **kw).generate(reqs)}
    auto = make_decoder(tiny_llama, **ORACLE, block_size="auto", **kw)
    auto.engine(64).warmup()
    auto.engine(64).policy.costs.update({1: 1.0, 2: 1.1, 4: 1.2})  # fixed: speculation may pay
    out = list(auto.generate(reqs))
    assert {r.id: r.token_ids for r in out} == ar
    report = auto.block_report()["64"]
    spec_calls = {b: n for b, n in report["decode_calls_by_block"].items() if b != "1"}
    assert spec_calls  # the policy ran speculative calls
    gated = report["gated_fraction_by_block"]
    if all_gated:
        assert set(gated.values()) == {1.0}
        assert all(r.draft_tokens_proposed == 0 for r in out)
    else:
        assert set(gated.values()) == {0.0}
        assert sum(r.draft_tokens_accepted for r in out) > 0
