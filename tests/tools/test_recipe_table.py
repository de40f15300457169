"""The recipe comparison's table reads each run's summary and marks what does not apply."""

from __future__ import annotations

from recipe_table import recipe_row, render


def _summary(step, tau, test):
    return {"step": step, "predicted_tokens": 123456, "train_seconds": 600.0, "prompts": {"train": 384},
            "tokens": {"train_response": 40000}, "evals": [{"step": 0, "decoder_tau": 1.0},
                                                           {"step": step, "decoder_tau": tau}],
            "test": {"prompts": 16, "max_new_tokens": 64, **test}}


def test_rows_take_the_last_evaluation_and_the_test_taus():
    row = recipe_row("full", _summary(400, 1.234, {"dflash_b16": {"tau": 1.3}, "ngram_b16": {"tau": 2.0}}))
    assert row["heldout_tau"] == 1.234 and row["train_minutes"] == 10.0 and row["step"] == 400
    assert row["dflash_b16"] == 1.3 and row["dflash_b8"] is None and "full distribution" in row["change"]


def test_table_has_one_line_per_recipe_and_dashes_where_nothing_was_measured():
    rows = [recipe_row("base", _summary(400, 1.1, {"dflash_b16": {"tau": 1.25}, "dflash_b8": {"tau": 1.2}})),
            recipe_row("b8", _summary(400, 1.15, {"dflash_b8": {"tau": 1.22}})),
            recipe_row("shipped", {"test": {"dflash_b16": {"tau": 1.302}}})]
    text = render(rows)
    lines = text.splitlines()
    assert lines[2].startswith("| base | 400 | 123,456 | 10.0 | 1.100 | 1.250 | 1.200 | - | - |")
    assert lines[3].startswith("| b8 | 400 | 123,456 | 10.0 | 1.150 | - | 1.220 |")
    assert lines[4] == "| shipped | - | - | - | - | 1.302 | - | - | - |"
    assert "- b8: trained at block 8" in text
