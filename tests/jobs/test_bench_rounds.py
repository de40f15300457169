"""The bench's rounds: every configuration runs at once, in turns, each on its own clock."""

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
