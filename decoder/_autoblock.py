"""Choosing the verified block length L from measured costs and observed acceptance.

Speculation pays only when the tokens a step commits outgrow what the step costs:

    tokens/s(L) = E[tokens per step | L] / seconds per step(L)
    E[tokens per step | L] = 1 + sum_{k=1}^{L-1} q_k,   q_k = P(at least k drafts accepted)

Seconds per step are measured at warmup for every candidate L at the engine's own
batch size (L = 1 is plain AR through the same state), because the ratio of an
L-token target pass to a 1-token pass depends on hardware and batch: near 1 on an
accelerator, 2-3x at L = 8-16 on a small CPU. q_k is counted from the steps
actually run. The policy explores at the largest L first, for a few steps (and again every
``explore_every`` decode calls, so it can notice acceptance improving), then runs
the argmax. AR is a candidate, so the choice is never expected to be slower than AR.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class BlockPolicy:
    candidates: tuple[int, ...]
    explore_every: int = 16
    step_seconds: dict[int, float] = dataclasses.field(default_factory=dict)
    trials: np.ndarray = dataclasses.field(init=False)  # [Lmax]: steps that could accept >= k
    successes: np.ndarray = dataclasses.field(init=False)  # [Lmax]: steps that accepted >= k
    calls: dict[int, int] = dataclasses.field(default_factory=dict)
    exploring: bool = False  # whether the last choice was an exploration (the engine keeps it short)
    _n_calls: int = 0

    def __post_init__(self):
        self.candidates = tuple(sorted(set(self.candidates)))
        top = self.candidates[-1]
        self.trials = np.zeros(top, np.int64)
        self.successes = np.zeros(top, np.int64)

    @property
    def largest(self) -> int:
        return self.candidates[-1]

    def observe(self, block: int, hist_delta: np.ndarray) -> None:
        """Adds the steps of one decode call. hist_delta [Lmax]: steps that committed i+1 tokens."""
        if block < 2:
            return
        steps = int(hist_delta.sum())
        if steps == 0:
            return
        committed = np.arange(1, len(hist_delta) + 1)
        for k in range(1, block):
            self.trials[k] += steps
            self.successes[k] += int(hist_delta[committed >= k + 1].sum())

    def acceptance(self) -> np.ndarray:
        """q_k for k = 1..Lmax-1 (index k); unobserved k count as 0."""
        q = np.zeros(self.largest, np.float64)
        seen = self.trials > 0
        q[seen] = self.successes[seen] / self.trials[seen]
        return q

    def expected_tokens(self, block: int) -> float:
        return 1.0 + float(self.acceptance()[1:block].sum())

    def throughput(self, block: int) -> float:
        """Expected committed tokens per second per row at this block length."""
        return self.expected_tokens(block) / self.step_seconds[block]

    def choose(self) -> int:
        self._n_calls += 1
        self.exploring = self.largest > 1 and len(self.candidates) > 1 and (
            self.trials[1] == 0 or self._n_calls % self.explore_every == 0)
        if self.exploring:
            block = self.largest
        elif len(self.candidates) == 1:
            block = self.largest
        else:
            block = max(self.candidates, key=self.throughput)
        self.calls[block] = self.calls.get(block, 0) + 1
        return block

    def report(self) -> dict:
        """What was measured and chosen, and why: for the job stats."""
        return {
            "candidates": list(self.candidates),
            "step_ms": {str(b): round(s * 1e3, 3) for b, s in sorted(self.step_seconds.items())},
            "acceptance_q": [round(float(x), 4) for x in self.acceptance()[1:]],
            "expected_tokens_per_step": {str(b): round(self.expected_tokens(b), 3) for b in self.candidates},
            "expected_tokens_per_s_per_row": {str(b): round(self.throughput(b), 2)
                                              for b in self.candidates if b in self.step_seconds},
            "decode_calls_by_block": {str(b): n for b, n in sorted(self.calls.items())},
        }
