"""A lazy warmup compiles the larger candidate block lengths only when the policy could want them."""

from __future__ import annotations

import numpy as np
import pytest

from dflash_batch.decoder import Request
from dflash_batch.decoder._autoblock import BlockPolicy
from dflash_batch.decoder._lazy_blocks import cost_floor, likely_tokens, merge_costs, next_wanted, pays_back
from compile_counter import count_compiles
from decoding import make_decoder
from oracle_proposer import ORACLE


def test_no_larger_block_is_wanted_while_a_promising_smaller_one_is_untried():
    policy = BlockPolicy((1, 2, 4, 8), costs={1: 1.0, 2: 1.2})
    assert next_wanted(policy) is None  # L=2's trial comes first: its acceptance bounds the larger ones


def test_a_larger_block_is_wanted_where_the_smaller_costs_too_much_to_try():
    policy = BlockPolicy((1, 2, 4, 8), costs={1: 1.0, 2: 1.9})  # 2 tokens at best for 1.9 AR steps
    assert next_wanted(policy) == 4  # 4 tokens at best, for no less than 1.9
    dear = BlockPolicy((1, 2, 4, 8), costs={1: 1.0, 2: 9.0})
    assert next_wanted(dear) is None  # even 8 tokens a step cannot pay for 9 AR steps


def test_the_next_block_is_wanted_when_its_optimistic_throughput_could_win():
    policy = BlockPolicy((1, 2, 4, 8), costs={1: 1.0, 2: 1.2})
    policy.observe(2, np.array([0, 10]))  # every draft accepted: L=4 could commit up to 4 tokens a step
    assert next_wanted(policy) == 4
    hopeless = BlockPolicy((1, 2, 4, 8), costs={1: 1.0, 2: 1.2})
    hopeless.observe(2, np.array([10, 0]))  # nothing accepted: a larger pass cannot pay either
    assert next_wanted(hopeless) is None


def test_a_block_that_could_win_is_wanted_only_where_the_work_left_pays_for_adding_it():
    policy = BlockPolicy((1, 2, 4, 8), costs={1: 1.0, 2: 1.2})
    policy.observe(2, np.array([0, 10]))  # every draft accepted: L=2 is best, 2 tokens per 1.2 s = 0.6 s a token
    # L=4 at its cost floor (1.4 s) could commit 4 tokens: 0.35 s a token, 100 tokens x 0.25 s = 25 s saved.
    assert pays_back(policy, 4, work_left=100, add_seconds=20)
    assert not pays_back(policy, 4, work_left=100, add_seconds=30)
    assert next_wanted(policy, work_left=100, ready_seconds=lambda b: 20) == 4
    assert next_wanted(policy, work_left=100, ready_seconds=lambda b: 30) == 8  # 8 tokens for 1.8 s: 37.5 s saved
    assert next_wanted(policy, work_left=10, ready_seconds=lambda b: 30) is None  # a small job decodes on with what it has
    assert next_wanted(policy, work_left=None, ready_seconds=lambda b: 1e9) == 4  # a stream: the work left is unknown


def test_the_payback_extends_the_seen_acceptance_geometrically_where_the_bound_keeps_it_flat():
    policy = BlockPolicy((1, 2, 4, 8), costs={1: 1.0, 2: 1.2})
    policy.observe(2, np.array([5, 5]))  # q_1 = 0.5
    assert policy.expected_tokens(4, optimistic=True) == pytest.approx(1 + 0.5 * 3)  # could win: the bound
    assert likely_tokens(policy, 4) == pytest.approx(1 + 0.5 + 0.25 + 0.125)  # would likely save: q_k = 0.5^k
    policy.observe(4, np.array([4, 2, 2, 2]))  # a call at L=4: q_1 .. q_3 all seen
    assert likely_tokens(policy, 4) == pytest.approx(policy.expected_tokens(4))  # all seen: no guess
    q = policy.acceptance()[1:4]
    assert likely_tokens(policy, 8) == pytest.approx(1 + q.sum() + sum(q[2] * (q[2] / q[1]) ** k for k in (1, 2, 3, 4)))


def test_only_the_smallest_uncosted_block_is_named():
    policy = BlockPolicy((1, 2, 4, 8), costs={1: 1.0, 2: 1.2, 4: 1.5})
    policy.observe(4, np.array([0, 0, 0, 10]))
    assert next_wanted(policy) == 8
    policy.costs[8] = 2.0
    assert next_wanted(policy) is None  # every candidate has a cost


def test_later_costs_are_scaled_to_the_first_ar_measurement():
    policy = BlockPolicy((1, 2, 4), costs={1: 1.0, 2: 1.2})
    merge_costs(policy, {1: [2.0, 2.0, 2.0], 4: [3.0, 3.0, 3.0]}, {4: [2.2, 2.2, 2.2]})  # a machine twice as slow
    assert policy.costs == pytest.approx({1: 1.0, 2: 1.2, 4: 1.5})
    assert policy.gated_costs == pytest.approx({4: 1.1})


def test_a_lazy_warmup_readies_ar_and_the_smallest_speculative_block(tiny_llama):
    dec = make_decoder(tiny_llama, mode="ngram", block_size="auto", batch_size=2, max_new_tokens=8,
                       prompt_buckets=(16,), prefill_chunk=16)
    dec.warmup(16, lazy=True)
    report = dec.block_report()["16"]
    assert list(report["warmup_seconds"]) == ["prefill", "decode L=1", "decode L=2", "block costs"]
    assert set(report["step_ms"]) == {"1", "2"}
    # What a compile could pay back over: every running row to its budget, the queue and the
    # rows after it spread over the slots; a stream's is unknown.
    reqs = [Request(id=str(i), token_ids=[5, 6, 7], max_new_tokens=8 if i else 4) for i in range(5)]
    run = dec.start(reqs, bucket=16, rows_after=3)
    assert run.refill() == 2
    assert run.work_left() == pytest.approx(max((4 + 8 + 3 * 8 + 3 * 36 / 5) / 2, 8))
    assert dec.start(iter(reqs), bucket=16, rows_after=3).work_left() is None
    assert dec.start(reqs, bucket=16).work_left() is None  # the rows after these unknown


@pytest.mark.slow
def test_larger_blocks_compile_when_drafts_are_accepted_and_the_tokens_stay_ar_s(tiny_llama, monkeypatch):
    from dflash_batch.decoder import _state

    monkeypatch.setattr(_state, "PROPOSER_BLOCK", 4)  # candidates 1, 2, 4: the fewest that show a lazy one
    rng = np.random.default_rng(5)
    reqs = [Request(id=str(i), token_ids=list(rng.integers(3, 128, size=int(rng.integers(2, 30)))),
                    max_new_tokens=24) for i in range(6)]
    kw = dict(batch_size=2, max_new_tokens=24, prompt_buckets=(32,), prefill_chunk=16)
    ar = {r.id: r.token_ids for r in make_decoder(tiny_llama, **kw).generate(reqs)}
    lazy = make_decoder(tiny_llama, **ORACLE, block_size="auto", **kw)
    engine = lazy.engine(32)
    # Step costs as on an accelerator, where a pass over L tokens costs little more than one
    # token's (this CPU's own would make every length look dear at these tiny shapes).
    fake = lambda s, blocks: ({b: [1e-3 * (1 + 0.05 * b)] * 3 for b in blocks},  # noqa: E731
                              {b: [1.2e-3] * 3 for b in blocks if b > 1})
    monkeypatch.setattr(engine, "_time_blocks", fake)
    lazy.warmup(32, lazy=True)
    assert lazy.blocks == (1, 2, 4) and set(lazy.block_report()["32"]["step_ms"]) == {"1", "2"}
    with count_compiles() as compiles:  # these rows are all the work (at 1 ms a step, too little to pay)
        assert {r.id: r.token_ids for r in lazy.generate(reqs, bucket=32, rows_after=0)} == ar
        assert compiles() == 0 and set(lazy.block_report()["32"]["step_ms"]) == {"1", "2"}
    with count_compiles() as compiles:  # a stream: the work left is unknown, so L=4 could pay
        assert {r.id: r.token_ids for r in lazy.generate(iter(reqs), bucket=32)} == ar  # parking lost nothing
        assert compiles() == 1  # L=4's program; the state came back in its old layout: nothing else recompiled
    report = lazy.block_report()["32"]
    # The oracle's drafts are always accepted: every larger length became worth compiling, once each.
    assert set(report["step_ms"]) == {str(b) for b in lazy.blocks}
    assert "decode L=4" in report["warmup_seconds"] and "block costs L=4" in report["warmup_seconds"]
    assert report["decode_calls_by_block"].get("4", 0) >= 1


def test_the_cost_floor_extends_the_marginal_cost_of_the_two_largest_timed_lengths_by_half():
    assert cost_floor({1: 1.0}, 4) == 1.0  # one length timed: no slope to go by
    assert cost_floor({1: 1.0, 2: 1.2, 4: 1.6}, 8) == pytest.approx(1.6 + 0.5 * 0.2 * 4)
    assert cost_floor({1: 1.0, 2: 0.9}, 4) == 0.9  # a noisy dip never lowers the floor below the last cost
