"""Automatic block length: measured costs and observed acceptance pick the fastest L, AR included."""

from __future__ import annotations

import numpy as np
import pytest

from dflash_batch.decoder import Decoder, Request
from dflash_batch.decoder._autoblock import BlockPolicy
from oracle_proposer import propose_oracle


def ar_ran(policy: BlockPolicy, steps: int = 8, per_step: float | None = None) -> None:
    """A full AR call ran (at its warmup cost unless told)."""
    policy.observe_cost(1, seconds=steps * (per_step or policy.step_seconds[1]), steps=steps)


def test_acceptance_is_counted_per_draft_position():
    policy = BlockPolicy((1, 4))
    # Four steps at L=4: two committed 1 token, one committed 2, one committed all 4.
    policy.observe(4, np.array([2, 1, 0, 1]))
    assert np.allclose(policy.acceptance()[1:], [0.5, 0.25, 0.25])
    assert policy.expected_tokens(4) == 2.0


def test_explores_upward_from_the_smallest_block_then_picks_best_throughput():
    policy = BlockPolicy((1, 2, 4), explore_every=1000, step_seconds={1: 1.0, 2: 1.2, 4: 1.5})
    assert policy.choose() == 2 and policy.exploring  # nothing observed yet: the cheapest try first
    policy.observe(2, np.array([0, 10]))  # the one draft always accepted: L=4 might pay more
    assert policy.choose() == 4 and policy.exploring
    policy.observe(4, np.array([0, 0, 0, 10]))  # every draft accepted: E = 4 tokens per step
    assert policy.choose() == 4 and not policy.exploring
    bad = BlockPolicy((1, 2, 4), explore_every=1000, step_seconds={1: 1.0, 2: 1.2, 4: 1.5})
    assert bad.choose() == 2
    bad.observe(2, np.array([10, 0]))  # nothing accepted: speculation only costs, larger L too
    assert bad.choose() == 1 and not bad.exploring
    report = bad.report()
    assert report["decode_calls_by_block"] == {"1": 1, "2": 1} and set(report["step_ms"]) == {"1", "2", "4"}


def test_re_explores_the_runner_up_every_so_many_decode_steps():
    def calls(policy: BlockPolicy, n: int) -> list[int]:
        chosen = []
        for _ in range(n):
            chosen.append(policy.choose())
            policy.observe_cost(chosen[-1], seconds=8 * policy.step_seconds[chosen[-1]], steps=8)
        return chosen

    policy = BlockPolicy((1, 4), explore_every=24, step_seconds={1: 1.0, 4: 3.0})
    policy.observe(4, np.array([5, 0, 0, 0]))
    assert calls(policy, 8) == [1, 1, 1, 4, 1, 1, 1, 4]  # 24 steps at AR, then the runner-up once
    good = BlockPolicy((1, 4), explore_every=24, step_seconds={1: 1.0, 4: 1.5})
    good.observe(4, np.array([0, 0, 0, 5]))
    assert calls(good, 4) == [4, 4, 4, 1]  # AR is the runner-up here: its cost is re-measured too


def test_auto_block_size_is_lossless_and_reports_its_choice(tiny_llama, monkeypatch):
    from dflash_batch.decoder import Request, _speculative

    monkeypatch.setitem(_speculative.PROPOSERS, "oracle", propose_oracle)
    rng = np.random.default_rng(11)
    reqs = [Request(id=str(i), token_ids=list(rng.integers(3, 128, size=int(rng.integers(2, 40)))),
                    max_new_tokens=int(rng.integers(1, 24))) for i in range(8)]
    kw = dict(batch_size=3, max_new_tokens=24, prompt_buckets=(64,), prefill_chunk=16)
    ar = {r.id: r.token_ids for r in Decoder(tiny_llama, **kw).generate(reqs)}
    auto = Decoder(tiny_llama, mode="oracle", block_size="auto", **kw)
    assert auto.blocks == (1, 2, 4, 8, 16)
    engine = auto.engine(64)
    engine.warmup()
    decode, probes = engine.phases.decode, []

    def logged(s, waiting, block, n_steps, gate):
        if engine.policy.exploring:
            probes.append(int(n_steps))
        return decode(s, waiting, block, n_steps, gate)

    engine.phases.decode = logged
    assert {r.id: r.token_ids for r in auto.generate(reqs)} == ar
    # A probe sees at least 16 row-steps: 6 steps at batch 3 (at batch 1, 4 steps judged q_1 on 4 tokens).
    assert probes and set(probes) == {6}
    report = auto.block_report()["64"]
    assert set(report["step_ms"]) == {"1", "2", "4", "8", "16"}
    # A perfect drafter: every draft is accepted, except where a row's budget or EOS cut
    # the step short (counted as a rejection, which only makes the policy conservative).
    assert report["acceptance_q"][0] > 0.8
    assert sum(report["decode_calls_by_block"].values()) >= 1
    assert 0 < report["decode_share"] < 1  # the engine timed its prefills, and the margin weighs them
    # The last rows drain with no request waiting: those calls weigh the slowest row's spread.
    assert sum(report["drain_calls_by_block"].values()) >= 1


def test_settled_on_ar_the_drafter_is_fed_only_ahead_of_a_probe():
    """Where AR rules, nothing reads the drafter's context until the runner-up's next probe,
    so prompts prefilled meanwhile skip feeding it; the probe waits until every row in the
    batch was fed, and so does drafting of any kind."""
    policy = BlockPolicy((1, 4), explore_every=100, step_seconds={1: 1.0, 4: 3.0})
    assert policy.needs_context(lead=20)  # nothing measured: the first probe drafts
    policy.observe(4, np.array([5, 0, 0, 0]))  # nothing accepted: AR rules
    ar_ran(policy, steps=50)
    assert policy.choose() == 1 and not policy.needs_context(lead=20)
    ar_ran(policy, steps=30)  # the probe is due in 20 steps: a row prefilled now may still be there
    assert policy.needs_context(lead=20) and not policy.needs_context(lead=10)
    ar_ran(policy, steps=20)
    assert policy.choose(ready=False) == 1 and not policy.exploring  # a row's prompt is not in the context
    assert policy.choose_drain(rows=2, remaining=10, ready=False) == 1
    assert policy.choose() == 4 and policy.exploring  # every row fed: the probe runs
    good = BlockPolicy((1, 4), explore_every=100, step_seconds={1: 1.0, 4: 1.5})
    good.observe(4, np.array([0, 0, 0, 5]))
    ar_ran(good)
    assert good.choose() == 4 and good.needs_context(lead=0)  # speculating: every prompt feeds it
    assert good.choose(ready=False) == 1 and good.choose_drain(rows=2, remaining=10, ready=False) == 1
    assert BlockPolicy((4,)).needs_context(lead=0) and not BlockPolicy((1,)).needs_context(lead=10**6)


def test_an_ar_settled_drafting_mode_skips_the_drafters_prompt_upkeep_losslessly(tiny_llama, tiny_drafter):
    """A random drafter never pays: its prompts go unfed between probes, output stays AR's, and
    no row is ever drafted for without its prompt in the drafter's context."""
    rng = np.random.default_rng(5)
    reqs = [Request(id=str(i), token_ids=list(rng.integers(3, 128, size=int(rng.integers(2, 40)))),
                    max_new_tokens=int(rng.integers(4, 12))) for i in range(40)]
    kw = dict(batch_size=3, max_new_tokens=12, prompt_buckets=(64,), prefill_chunk=16)
    ar = {r.id: r.token_ids for r in Decoder(tiny_llama, **kw).generate(reqs)}
    auto = Decoder(tiny_llama, mode="dflash", drafter=tiny_drafter, block_size="auto", **kw)
    engine = auto.engine(64)
    engine.warmup()
    engine.policy.explore_every = 40
    decode, drafted_for = engine.phases.decode, []

    def logged(s, waiting, block, n_steps, gate):
        if block > 1:  # every active row's context holds at least its prompt
            active = ~np.asarray(s.done)
            drafted_for.append(bool(np.all(np.asarray(s.extra.ctx_len)[active] > 0)))
        return decode(s, waiting, block, n_steps, gate)

    engine.phases.decode = logged
    assert {r.id: r.token_ids for r in auto.generate(reqs)} == ar
    report = auto.block_report()["64"]
    assert report["decode_calls_by_block"]["1"] > 1 and drafted_for and all(drafted_for)
    counts = report["drafter_context_prefills"]
    assert counts["fed"] + counts["skipped"] == len(reqs) and counts["skipped"] > 0 and counts["fed"] > 3


def test_decode_calls_scale_every_warmup_cost_alike():
    policy = BlockPolicy((1, 4), explore_every=1000, step_seconds={1: 1.0, 4: 1.5})
    policy.observe(4, np.array([0, 10, 0, 0]))  # 2 tokens per step at L=4
    policy.observe_cost(1, seconds=24 * 1.0, steps=24)  # running, L=1 steps cost what warmup said,
    policy.observe_cost(4, seconds=24 * 3.0, steps=24)  # and L=4 steps twice that
    assert policy.slowdown() == (24 + 72) / (24 * 1.0 + 24 * 1.5)
    # The ratio stays warmup's: the calls ran at different moments of a shared machine.
    assert policy.cost(4) == pytest.approx(1.5 * 1.6) and policy.cost(1) == pytest.approx(1.6)
    assert policy.choose() == 4  # 2 / 2.4 beats 1 / 1.6
    assert policy.report()["step_ms_refined"] == {"1": 1600.0, "4": 2400.0}
    policy.observe_cost(1, seconds=0.0, steps=0)  # a call that ran no step changes nothing
    assert policy.cost(1) == pytest.approx(1.6)


def test_a_slow_spell_slows_every_block_length_alike():
    policy = BlockPolicy((1, 2), explore_every=1000, step_seconds={1: 1.0, 2: 1.2})
    policy.observe(2, np.array([50, 50]))  # E = 1.5 tokens per step: 1.25x AR at warmup costs
    assert policy.choose() == 2
    policy.observe_cost(2, seconds=100 * 2.4, steps=100)  # the machine got twice as slow
    ar_ran(policy, per_step=2.0)
    # Had AR kept its warmup cost, it would now look 1.6x better; the drift applies to it as well.
    assert policy.cost(1) == pytest.approx(2.0) and policy.cost(2) == pytest.approx(2.4)
    assert policy.choose() == 2


def test_exploring_stops_where_acceptance_rules_larger_blocks_out():
    # Large passes are dear (a CPU at batch 16).
    policy = BlockPolicy((1, 2, 4, 8, 16), explore_every=1000,
                         step_seconds={1: 1.0, 2: 1.1, 4: 1.3, 8: 2.0, 16: 6.0})
    assert policy.choose() == 2 and policy.exploring
    policy.observe(2, np.array([2, 2]))  # q_1 = 1/2
    # Optimistically q_2, q_3 = 1/2 too: L=4 might commit 2.5 per 1.3 s, better than L=2's 1.5 / 1.1.
    assert policy.choose() == 4 and policy.exploring
    policy.observe(4, np.array([4, 2, 1, 1]))  # q_1..q_3 = 1/2, 1/4, 1/8 over all the steps seen
    # L=8 at best adds 4 x 1/8 tokens for 0.7 s more: no better than L=4, so it is never tried.
    assert policy.optimistic_tokens(8) / policy.cost(8) < policy.throughput(4)
    ar_ran(policy)
    assert [policy.choose() for _ in range(5)] == [4] * 5 and not policy.exploring
    assert 8 not in policy.calls and 16 not in policy.calls


def test_no_exploration_where_no_block_could_pay():
    # A 2-token pass costs more than twice a 1-token pass: even a perfect drafter cannot win.
    policy = BlockPolicy((1, 2, 4), explore_every=1000, step_seconds={1: 1.0, 2: 2.1, 4: 4.5})
    assert [policy.choose() for _ in range(3)] == [1, 1, 1] and not policy.exploring


def test_a_near_tie_goes_to_ar():
    policy = BlockPolicy((1, 2), explore_every=1000, step_seconds={1: 1.0, 2: 1.2}, margin=0.05)
    policy.observe(2, np.array([77, 23]))  # E = 1.23 tokens per step: 1.025x AR's throughput
    assert policy.choose() == 1
    policy.observe(2, np.array([0, 200]))  # now E = 1.74: 1.45x
    ar_ran(policy)
    assert policy.choose() == 2


def test_the_margin_is_the_jobs_so_prefill_time_raises_the_bar():
    """Prefill runs at AR's speed in every mode: a 10% faster decode is a 10% faster job only
    where decode is all the job does, and a 5% faster one where it is half."""
    policy = BlockPolicy((1, 2), explore_every=1000, step_seconds={1: 1.0, 2: 1.2})
    policy.observe(2, np.array([68, 32]))  # E = 1.32 tokens per step: 1.10x AR's decode throughput
    ar_ran(policy, steps=100)
    assert policy.decode_share() == 1.0 and policy.required_gain() == pytest.approx(1.05)
    assert policy.choose() == 2
    policy.observe_prefill(100.0)  # as long as the decode calls so far
    assert policy.decode_share() == pytest.approx(0.5)
    assert policy.required_gain() == pytest.approx(0.5 / (0.5 - 0.05 / 1.05))  # 1.105: a 5% job gain
    assert policy.choose() == 1
    report = policy.report()
    assert report["decode_share"] == 0.5 and report["required_gain_over_ar"] == pytest.approx(1.105, abs=1e-3)
    policy.observe_prefill(1e6)  # decode is a sliver of the job: no block length can pay
    assert policy.required_gain() == float("inf") and policy.choose() == 1


def test_the_drain_weighs_the_slowest_rows_spread():
    policy = BlockPolicy((1, 4), explore_every=1000, step_seconds={1: 1.0, 4: 1.6})
    policy.observe(4, np.array([5, 2, 1, 2]))  # q = 0.5, 0.3, 0.2: E[T] = 2, Var[T] = 5.4 - 4
    assert policy.tokens_variance(4) == pytest.approx(1.4) and policy.tokens_variance(1) == 0.0
    ar_ran(policy)
    assert policy.choose() == 4  # on average 2 tokens per 1.6 s beat 1 per 1 s
    # One row left: it needs 60 / 2 steps on average, 48 s against AR's 60 s.
    assert policy.drain_seconds(4, rows=1, remaining=60) == pytest.approx(48.0)
    assert policy.choose_drain(rows=1, remaining=60) == 4
    # 64 rows: the slowest needs ~2.3 spreads more steps, and AR, which has no spread, wins.
    assert policy.drain_seconds(4, rows=64, remaining=60) > policy.drain_seconds(1, rows=64, remaining=60) == 60.0
    assert policy.choose_drain(rows=64, remaining=60) == 1
    assert policy.report()["drain_calls_by_block"] == {"1": 1, "4": 1}


def test_a_drain_before_any_acceptance_is_seen_explores():
    policy = BlockPolicy((1, 4), explore_every=1000, step_seconds={1: 1.0, 4: 1.6})
    assert policy.choose_drain(rows=4, remaining=30) == 4 and policy.exploring


def test_warmup_costs_are_same_round_ratios_to_ar():
    policy = BlockPolicy((1, 2, 4))
    # Round 2 was a slow spell for every length; round 3 only for AR's call.
    policy.set_warmup_costs({1: [1.0, 2.0, 3.0], 2: [1.2, 2.4, 1.2], 4: [1.5, 3.0, 1.5]},
                            gated={2: [1.1, 2.2, 1.1], 4: [1.3, 2.6, 1.3]})
    assert policy.step_seconds == {1: 1.0, 2: pytest.approx(1.2), 4: pytest.approx(1.5)}
    assert policy.gated_seconds == {2: pytest.approx(1.1), 4: pytest.approx(1.3)}
    # Ratios that disagree: the choice takes the dear side (the upper quartile), not the median.
    spread = BlockPolicy((1, 2))
    spread.set_warmup_costs({1: [1.0] * 5, 2: [1.3, 1.5, 1.2, 1.4, 1.6]})
    assert spread.step_seconds[2] == pytest.approx(1.5)
    # A length without AR beside it, or with a call that ran no step, keeps its best call.
    lone = BlockPolicy((2, 4))
    lone.set_warmup_costs({2: [3.0, 2.0], 4: []})
    assert lone.step_seconds == {2: 2.0}


def test_ar_calls_at_a_slow_moment_do_not_make_a_near_tie_look_like_a_gain():
    """Measured at batch 16 on a 2-core CPU: a job's AR calls (its drain, its probes) ran at
    120 ms per step, its L=2 calls at 155, while side by side at warmup L=2 costs 1.37x AR.
    With q_1 = 0.44, L=2 gains 5% at best, within the margin; costs from each call's own wall
    time said it won by 11%."""
    policy = BlockPolicy((1, 2), explore_every=1000, step_seconds={1: 0.100, 2: 0.137})
    policy.observe(2, np.array([56, 44]))
    policy.observe_cost(1, seconds=80 * 0.120, steps=80)
    policy.observe_cost(2, seconds=400 * 0.155, steps=400)
    policy.observe_prefill(80 * 0.120 + 400 * 0.155)  # a batch-16 job prefills about half the time
    assert policy.cost(2) / policy.cost(1) == pytest.approx(1.37)
    assert [policy.choose() for _ in range(3)] == [1, 1, 1]


def test_gated_steps_are_no_evidence_of_acceptance_but_count_in_the_expectation():
    policy = BlockPolicy((1, 4), explore_every=1000, step_seconds={1: 1.0, 4: 2.0})
    assert policy.gate(4) == 2.0 and policy.gate(1) == 0.0
    # 10 row-steps at L=4: 6 gated (one token each), 4 verified that committed all 4 tokens.
    policy.observe(4, np.array([6, 0, 0, 4]), gated=6)
    assert np.allclose(policy.acceptance()[1:], [1.0, 1.0, 1.0])  # from the 4 verified steps
    assert policy.gated_fraction(4) == 0.6
    assert policy.expected_tokens(4) == pytest.approx(1 + 0.4 * 3)  # 2.2 tokens per step
    assert policy.tokens_variance(4) == pytest.approx(0.6 * 1 + 0.4 * 16 - 2.2**2)
    assert policy.report()["gated_fraction_by_block"] == {"4": 0.6}
    # A call at L=4 costs its pass on the verified steps and a gated step (timed at warmup) on the others.
    policy.gated_seconds[4] = 1.25
    assert policy.cost(4) == pytest.approx(0.4 * 2.0 + 0.6 * 1.25)
    assert policy.gate(4) == pytest.approx(2.0 / 1.25)  # verify where 1 + promise outgrows 1.6 AR steps
    assert BlockPolicy((4,), step_seconds={4: 2.0}).gate(4) == 0.0  # a fixed L: nothing to fall back on


@pytest.mark.parametrize("gate, all_gated", [(1e6, True), (0.0, False)])
def test_the_per_step_gate_runs_steps_as_ar_where_proposals_cannot_pay(tiny_llama, monkeypatch, gate, all_gated):
    """A gate no proposal can clear turns every step of a speculative call into an AR step
    (one token, nothing verified); gate 0 verifies every step. Tokens equal AR's either way."""
    from dflash_batch.decoder import Request, _speculative

    monkeypatch.setitem(_speculative.PROPOSERS, "oracle", propose_oracle)
    monkeypatch.setattr(BlockPolicy, "gate", lambda self, block: gate)
    rng = np.random.default_rng(5)
    reqs = [Request(id=str(i), token_ids=list(rng.integers(3, 128, size=int(rng.integers(2, 40)))),
                    max_new_tokens=16, temperature=0.7 if i % 2 else 0.0, seed=i) for i in range(6)]
    kw = dict(batch_size=3, max_new_tokens=16, prompt_buckets=(64,), prefill_chunk=16)
    ar = {r.id: r.token_ids for r in Decoder(tiny_llama, **kw).generate(reqs)}
    auto = Decoder(tiny_llama, mode="oracle", block_size="auto", **kw)
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
