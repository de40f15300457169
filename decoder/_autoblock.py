"""Choosing each decode call's verified block length (1 = plain AR) from costs and acceptance.

    tokens/s(L) = E[tokens per step | L] / seconds per step(L)

1. Costs. Warmup times every candidate L side by side, round-robin, at the engine's own batch
   size; where the per-step gate may fall back to AR, it also times a step the gate ran as AR.
   Each cost is AR's best step times the upper quartile of the same-round ratios to AR, so a
   shared machine's slow spells cancel and what noise remains leans the choice to AR.
2. Acceptance. q_k = P(at least k drafts accepted), counted over the verified steps of every
   call (``AcceptanceTally`` in decoder/_acceptance.py, from the counts each call returns).
   With g_L the share of steps the gate ran as AR at L:
   E[tokens | L] = 1 + (1 - g_L) * sum_{k<L} q_k, at (1 - g_L) * c_L + g_L * c'_L per step.
3. Choice. The best estimate wins, but a speculative L must beat AR by ``margin``. A length whose
   q_k are not all seen yet is tried in a short call if it could still win with its unseen q_k
   as high as the last seen one (acceptance never rises with k); the smallest such L first, so a
   cheap call bounds the dear ones. Every ``recheck_every`` calls the runner-up runs once,
   because acceptance drifts over a job.

The gate itself runs inside the decode loop (decoder/_speculative.py): it verifies a block only
where the batch's proposals promise more tokens than c_L / c'_L AR steps would commit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dflash_batch.decoder._acceptance import AcceptanceTally


@dataclasses.dataclass
class BlockPolicy:
    candidates: tuple[int, ...]
    margin: float = 0.10  # a speculative L must promise this much more than AR's tokens/s
    recheck_every: int = 64  # decode calls between runs of the runner-up
    costs: dict[int, float] = dataclasses.field(default_factory=dict)  # seconds per step, by L
    gated_costs: dict[int, float] = dataclasses.field(default_factory=dict)  # a gated step's, by L
    calls: dict[int, int] = dataclasses.field(default_factory=dict)
    tally: AcceptanceTally = dataclasses.field(init=False)  # q_k and the gated shares
    _since_recheck: int = 0

    def __post_init__(self):
        self.candidates = tuple(sorted(set(self.candidates)))
        self.tally = AcceptanceTally(self.candidates[-1])

    def set_costs(self, per_step: dict[int, list[float]], gated: dict[int, list[float]] | None = None) -> None:
        """Step 1: ``per_step[L][r]`` is warmup round r's seconds per step at L; ``gated[L][r]``
        the same with every step gated. Without AR's rounds beside them, each L's best round."""
        ar = per_step.get(1) or []

        def cost(times: list[float]) -> float:
            if len(times) != len(ar):
                return min(times)
            return min(ar) * float(np.percentile([t / a for t, a in zip(times, ar)], 75))

        self.costs.update({b: cost(t) for b, t in per_step.items() if t})
        self.gated_costs.update({b: cost(t) for b, t in (gated or {}).items() if t})

    def observe(self, block: int, hist_delta: np.ndarray, gated: int = 0) -> None:
        """Step 2, one call's counts (``AcceptanceTally.observe``)."""
        self.tally.observe(block, hist_delta, gated)

    def acceptance(self) -> np.ndarray:
        """q_k at index k (index 0 unused); unseen k are 0."""
        return self.tally.q()

    def expected_tokens(self, block: int, optimistic: bool = False) -> float:
        """E[tokens per step | L]; ``optimistic``: unseen q_k as high as the last seen q (1 at first)."""
        q = self.acceptance()[1:block]
        if optimistic:
            seen = self.tally.seen(block)
            q = np.where(seen, q, np.minimum.accumulate(np.where(seen, q, 1.0)))
        return 1.0 + (1.0 - self.tally.gated_share(block)) * float(q.sum())

    def cost(self, block: int) -> float:
        """Seconds per step of a call at L: the L-token pass, or a gated step, in the gate's share."""
        g = self.tally.gated_share(block)
        return (1.0 - g) * self.costs[block] + g * self.gated_costs.get(block, self.costs[block])

    def throughput(self, block: int, optimistic: bool = False) -> float:
        return self.expected_tokens(block, optimistic) / self.cost(block)

    def gate(self, block: int) -> float:
        """What the per-step gate weighs the proposals against: the L-token pass's cost in gated
        steps (0 = always verify: a fixed L, or no AR to fall back on)."""
        if block < 2 or 1 not in self.candidates or block not in self.costs or 1 not in self.costs:
            return 0.0
        return self.costs[block] / self.gated_costs.get(block, self.costs[1])

    def best(self) -> int:
        """The costed length with the best estimated tokens/s; a speculative one only where it
        beats AR by ``margin``."""
        costed = [b for b in self.candidates if b in self.costs]
        best = max(costed, key=self.throughput)
        if 1 in costed and self.throughput(best) < (1 + self.margin) * self.throughput(1):
            best = 1
        return best

    def choose(self) -> tuple[int, bool]:
        """Step 3: the next call's block length, and whether it is a short trial."""
        if len(self.candidates) == 1:
            block, trial = self.candidates[0], False
        else:
            costed = [b for b in self.candidates if b in self.costs]
            best = self.best()
            untried = [b for b in costed if b > 1 and not self.tally.seen(b).all()
                       and self.throughput(b, optimistic=True) > (1 + self.margin) * self.throughput(best)]
            self._since_recheck += 1
            if untried:
                block, trial = untried[0], True
            elif self._since_recheck >= self.recheck_every and any(b > 1 and b != best for b in costed):
                block = max((b for b in costed if b > 1 and b != best), key=lambda b: self.throughput(b, True))
                trial, self._since_recheck = True, 0
            else:
                block, trial = best, False
        self.calls[block] = self.calls.get(block, 0) + 1
        return block, trial

    def report(self) -> dict:
        """What was measured and chosen, for the job stats."""
        costed = [b for b in self.candidates if b in self.costs]
        return {
            "candidates": list(self.candidates),
            "step_ms": {str(b): round(c * 1e3, 3) for b, c in sorted(self.costs.items())},
            "gated_step_ms": {str(b): round(c * 1e3, 3) for b, c in sorted(self.gated_costs.items())},
            "acceptance_q": [round(float(x), 4) for x in self.acceptance()[1:]],
            "expected_tokens_per_step": {str(b): round(self.expected_tokens(b), 3) for b in self.candidates},
            "expected_tokens_per_s_per_row": {str(b): round(self.throughput(b), 2) for b in costed},
            "decode_calls_by_block": {str(b): n for b, n in sorted(self.calls.items())},
            "gated_fraction_by_block": {str(b): round(self.tally.gated_share(b), 3) for b in sorted(self.tally.row_steps)},
        }
