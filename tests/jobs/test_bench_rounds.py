"""The bench's rounds: every configuration runs at once, in turns, each on its own clock."""

import pytest

from dflash_batch.jobs._bench import run_rounds


class TurnCell:
    """A configuration whose run takes ``rows`` turns; it logs each turn it takes."""

    def __init__(self, name: str, rows: int, log: list[str]):
        self.mode, self.block_size, self.rows, self.log, self.runs = name, 1, rows, log, []

    def start(self) -> None:
        self.left = self.rows

    def advance(self) -> bool:
        if self.left == 0:
            self.runs.append(float(self.rows))
            return False
        self.left -= 1
        self.log.append(self.mode)
        return True


def test_cells_take_turns_one_row_each_and_the_first_turn_rotates():
    log: list[str] = []
    cells = [TurnCell("a", 3, log), TurnCell("b", 2, log), TurnCell("c", 3, log)]
    run_rounds(cells, 2)
    first, second = log[:8], log[8:]
    assert first == ["a", "b", "c", "a", "b", "c", "a", "c"]
    assert second == ["b", "c", "a", "b", "c", "a", "c", "a"]
    assert [c.runs for c in cells] == [[3.0, 3.0], [2.0, 2.0], [3.0, 3.0]]


def test_paired_ratios_compare_the_same_row_of_the_same_round():
    from dflash_batch.jobs._bench import paired_ratios

    ar = [[("a", 10, 1.0), ("b", 20, 4.0)], [("a", 10, 3.0), ("b", 20, 2.0)]]  # round 2's first turn was slow
    cell = [[("a", 10, 0.5), ("b", 20, 8.0)], [("a", 10, 3.0), ("b", 20, 1.0)]]
    assert paired_ratios(cell, ar) == [2.0, 0.5, 1.0, 2.0]
    assert paired_ratios([[("b", 20, 1.0), ("a", 10, 1.0)], cell[1]], ar) is None  # another order: no pairs


def test_a_decoder_cells_turn_is_one_prefill_or_one_decode_call(tiny_llama):
    """Turns of about a second (a prompt's prefill, or one decode call), not of a finished row:
    where rows finish in waves, a row's turn was a whole wave of prefills and decode steps.
    At batch 1 each row still books all the turns since the row before (``paired_ratios``)."""
    import numpy as np

    from dflash_batch.decoder import Request
    from dflash_batch.jobs._bench import DecoderCell

    rng = np.random.default_rng(3)
    reqs = [Request(id=str(i), token_ids=list(rng.integers(3, 128, size=12)), max_new_tokens=40) for i in range(3)]
    cell = DecoderCell(tiny_llama, reqs, batch_size=1, max_new_tokens=40, block_size=1, prompt_buckets=(16,))
    cell.start()
    turns = 1
    while cell.advance():
        turns += 1
    rows = cell.turns[-1]
    assert [r[0] for r in rows] == ["0", "1", "2"]
    calls = sum(-(-(len(t) - 1) // cell.decoder.config.chunk_steps) for t in cell.tokens.values())  # 16 steps a call
    assert turns == len(reqs) + calls + 1  # and the last, which ends the run
    # Every turn of the run is booked to a row, but the last (which finds nothing left to do).
    assert sum(r[2] for r in rows) == pytest.approx(sum(r[1] for r in rows) / cell.runs[-1], rel=0.02)
