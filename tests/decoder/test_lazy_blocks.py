"""A lazy warmup compiles the larger candidate block lengths only when the policy could want them."""

from __future__ import annotations

import numpy as np
import pytest

from dflash_batch.decoder import Request
from dflash_batch.decoder._autoblock import BlockPolicy
from dflash_batch.decoder._lazy_blocks import cost_floor, merge_costs, next_wanted
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
    with count_compiles() as compiles:
        assert {r.id: r.token_ids for r in lazy.generate(reqs)} == ar  # parking the state mid-run lost nothing
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
