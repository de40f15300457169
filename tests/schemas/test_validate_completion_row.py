"""validate_completion_row: the self-check on rows the job writes."""

import pytest

from dflash_batch.schemas import FINISH_REASONS, validate_completion_row

GOOD = {"id": "a", "completion": "hi", "completion_token_ids": [5, 6], "finish_reason": "length",
        "prompt_tokens": 3, "completion_tokens": 2, "decode_steps": 1, "draft_tokens_proposed": 7,
        "draft_tokens_accepted": 1, "accepted_per_step": [0, 1], "decode_seconds": 0.2, "mode": "dflash"}  # fmt: skip


def test_finish_reasons_are_the_documented_three():
    assert FINISH_REASONS == ("stop", "length", "eos")


@pytest.mark.parametrize("reason", FINISH_REASONS)
def test_good_row_passes(reason):
    assert validate_completion_row({**GOOD, "finish_reason": reason}) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"finish_reason": "done"}, "finish_reason must be one of stop/length/eos, got 'done'"),
        ({"finish_reason": None}, "finish_reason must be one of"),
        ({"id": ""}, "id is empty"),
        ({"completion": None}, "completion must be a string"),
        ({"prompt_tokens": -1}, "prompt_tokens must be a non-negative integer, got -1"),
        ({"decode_steps": 1.5}, "decode_steps must be a non-negative integer"),
        ({"decode_seconds": -0.1}, "decode_seconds must be a non-negative finite number"),
        ({"draft_tokens_accepted": 8}, "draft_tokens_accepted (8) exceeds draft_tokens_proposed (7)"),
        ({"accepted_per_step": [1, -1]}, "accepted_per_step must be a list of non-negative integers"),
        ({"completion_tokens": 3}, "completion_tokens is 3 but completion_token_ids has 2"),
        ({"mode": "fast"}, "mode must be one of ar/dflash"),
    ],
)
def test_bad_row_gives_a_reason_naming_the_field(change, reason):
    got = validate_completion_row({**GOOD, **change})
    assert got is not None and got.startswith(reason), got
