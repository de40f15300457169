"""Automatic block length: measured costs and observed acceptance pick the fastest L, AR included."""

from __future__ import annotations

import numpy as np

from dflash_batch.decoder import Decoder
from dflash_batch.decoder._autoblock import BlockPolicy
from oracle_proposer import propose_oracle


def test_acceptance_is_counted_per_draft_position():
    policy = BlockPolicy((1, 4))
    # Four steps at L=4: two committed 1 token, one committed 2, one committed all 4.
    policy.observe(4, np.array([2, 1, 0, 1]))
    assert np.allclose(policy.acceptance()[1:], [0.5, 0.25, 0.25])
    assert policy.expected_tokens(4) == 2.0


def test_explores_the_largest_block_first_then_picks_best_throughput():
    policy = BlockPolicy((1, 2, 4), explore_every=1000, step_seconds={1: 1.0, 2: 1.2, 4: 1.5})
    assert policy.choose() == 4  # nothing observed yet
    policy.observe(4, np.array([0, 0, 0, 10]))  # every draft accepted: E = 4 tokens per step
    assert policy.choose() == 4
    bad = BlockPolicy((1, 2, 4), explore_every=1000, step_seconds={1: 1.0, 2: 1.2, 4: 1.5})
    bad.observe(4, np.array([10, 0, 0, 0]))  # nothing accepted: speculation only costs
    assert bad.choose() == 1
    report = bad.report()
    assert report["decode_calls_by_block"] == {"1": 1} and set(report["step_ms"]) == {"1", "2", "4"}


def test_re_explores_periodically():
    policy = BlockPolicy((1, 4), explore_every=3, step_seconds={1: 1.0, 4: 3.0})
    policy.observe(4, np.array([5, 0, 0, 0]))
    assert [policy.choose() for _ in range(6)] == [1, 1, 4, 1, 1, 4]


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
    assert {r.id: r.token_ids for r in auto.generate(reqs)} == ar
    report = auto.block_report()["64"]
    assert set(report["step_ms"]) == {"1", "2", "4", "8", "16"}
    # A perfect drafter: every draft is accepted, except where a row's budget or EOS cut
    # the step short (counted as a rejection, which only makes the policy conservative).
    assert report["acceptance_q"][0] > 0.8
    assert sum(report["decode_calls_by_block"].values()) >= 1


def test_decode_calls_refine_the_warmup_cost_estimate():
    policy = BlockPolicy((1, 4), explore_every=1000, step_seconds={1: 1.0, 4: 1.5}, warmup_weight=8)
    policy.observe(4, np.array([0, 10, 0, 0]))  # 2 tokens per step at L=4
    assert policy.choose() == 4  # 2 / 1.5 beats 1 / 1.0
    policy.observe_cost(4, seconds=24 * 3.0, steps=24)  # running, L=4 steps really cost 3 s
    assert policy.cost(4) == (8 * 1.5 + 72.0) / 32
    assert policy.choose() == 1  # 2 / 2.625 loses to AR
    assert policy.report()["step_ms_refined"] == {"1": 1000.0, "4": 2625.0}
    policy.observe_cost(1, seconds=0.0, steps=0)  # a call that ran no step changes nothing
    assert policy.cost(1) == 1.0


def test_explores_where_optimism_pays_and_stops_when_acceptance_rules_larger_blocks_out():
    # Large passes are dear (a CPU at batch 16): if every draft were accepted, L=8 would pay most.
    policy = BlockPolicy((1, 2, 4, 8, 16), explore_every=1000,
                         step_seconds={1: 1.0, 2: 1.1, 4: 1.3, 8: 2.0, 16: 6.0})
    assert policy.choose() == 8 and policy.exploring
    # Eight steps at L=8 committed 1, 1, 1, 1, 2, 2, 3 and 4 tokens: q_1..q_3 = 1/2, 1/4, 1/8, q_4..q_7 = 0.
    policy.observe(8, np.array([4, 2, 1, 1, 0, 0, 0, 0]))
    assert policy.optimistic_tokens(16) == policy.expected_tokens(8) == 1.875
    # E = 1.875 at L = 4 and 8; 1.875 / 1.3 beats AR (1 / 1.0) and everything else; L=16 is never tried.
    assert [policy.choose() for _ in range(5)] == [4] * 5 and not policy.exploring
    assert 16 not in policy.calls


def test_a_near_tie_goes_to_ar():
    policy = BlockPolicy((1, 2), explore_every=1000, step_seconds={1: 1.0, 2: 1.2}, margin=0.05)
    policy.observe(2, np.array([77, 23]))  # E = 1.23 tokens per step: 1.025x AR's throughput
    assert policy.choose() == 1
    policy.observe(2, np.array([0, 200]))  # now E = 1.74: 1.45x
    assert policy.choose() == 2
