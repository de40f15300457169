"""tau and committed tokens read from an accepted-per-step histogram (index i: steps committing i + 1)."""

import numpy as np
import pytest

from dflash_batch.schemas import add_histograms, committed_tokens, observed_range, tau_from_histogram


def test_committed_tokens_weights_each_step_size_by_its_tokens():
    # 3 steps of 1 token, 0 of 2, 2 of 3: 3 + 6 = 9 tokens.
    assert committed_tokens([3, 0, 2]) == 9
    assert committed_tokens(np.array([0, 0, 0, 4], np.int16)) == 16


def test_tau_counts_the_bonus_token():
    # A step that accepted no draft token still commits the bonus: tau 1, never 0.
    assert tau_from_histogram([5]) == 1.0
    assert tau_from_histogram([3, 0, 2]) == pytest.approx(9 / 5)


def test_tau_of_no_steps_is_what_the_caller_names():
    assert tau_from_histogram([]) is None
    assert tau_from_histogram([0, 0, 0]) is None
    assert tau_from_histogram([0, 0], empty=1.0) == 1.0


def test_add_histograms_pads_the_shorter():
    assert add_histograms([1, 2], [0, 1, 5]) == [1, 3, 5]
    assert add_histograms([], []) == []


def test_observed_range_drops_step_sizes_that_never_occurred():
    assert observed_range([5, 0, 3, 1] + [0] * 12) == [5, 0, 3, 1]
    assert observed_range([0] * 16) == []
