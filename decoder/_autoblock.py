"""Choosing the verified block length L from measured costs and observed acceptance.

Speculation pays only when the tokens a step commits outgrow what the step costs:

    tokens/s(L) = E[tokens per step | L] / seconds per step(L)
    E[tokens per step | L] = 1 + sum_{k=1}^{L-1} q_k,   q_k = P(at least k drafts accepted)

Seconds per step are measured at warmup for every candidate L at the engine's own
batch size (L = 1 is plain AR through the same state), because the ratio of an L-token
target pass to a 1-token pass depends on hardware and batch: near 1 on an accelerator,
2-3x at L = 8-16 on a small CPU. Warmup times the lengths round-robin, and each L's cost
relative to AR is the upper quartile of its same-round ratios (``set_warmup_costs``). Those ratios
are properties of the compiled passes (their shapes are static), and they are the only
per-L costs the choice uses: decode calls at different L run at different moments, so
their own wall times would compare one moment of a shared machine with another (measured:
a job's AR calls, run in its drain and its probes, looked 20% dearer per step than AR
steps timed beside L=2 steps, and L=2 then looked 8% faster than AR where it broke even). The
calls' wall times only scale every L alike, by the machine's drift since warmup (``cost``).
q_k is counted from the steps actually run.

Within a call, each step may still fall back to AR: the decoder's gate (``gate``; see
decoder/_speculative.py) verifies the L-token block only where the batch's proposals promise
more tokens per second than an AR step, so a call at L commits 1 + (1 - g_L) sum q_k tokens
per step, g_L being the share of its steps gated (counted per call; q_k comes from the
verified steps alone), at a cost per step that mixes the L-token pass and the gated step
(an AR pass, plus the proposal the gate weighed), both timed at warmup.

Exploring is a short call (a few steps). Each L has an *optimistic* throughput: unobserved
q_k are taken as high as the last observed one allows (q_k never grows with k; 1 before
anything is seen). Exploration walks upward: it runs the smallest L with an unobserved q_k
whose optimistic throughput beats the best estimate. The smallest L is the cheapest call,
and the q_k it measures bound every larger L, so where large passes are dear (a CPU at
batch 16) the walk stops after one or two cheap calls, and where they are nearly free (an
accelerator) it climbs to the largest L in a few. Every ``explore_every`` decode steps the
runner-up (the best other L by optimistic throughput, AR included) runs once, so improving
acceptance is noticed. Otherwise the policy runs the argmax, except that a speculative L
must promise the *job* ``margin`` more tokens/s than AR (estimates are noisy, and near a tie
AR is the safe side). The job, not the decode calls: prefill runs at the same speed in every
mode, so a decode gain shrinks by the share of time spent outside decode calls, which the
engine measures as it goes (``required_gain``). On a 2-core CPU that share is 22% at batch 1,
51% at batch 8 and 59% at batch 16 (measured), where a 10% decode gain is a 4-5% job gain,
within what the estimates miss: speculating there at a predicted 10.7% lost 4-6% in the
bench. AR is a candidate, so the choice is never expected to be slower than AR.

Nor is what a drafting mode pays outside the choice, where AR rules: ``dflash`` and
``hybrid`` feed each prompt to the drafter at prefill (``fc`` and every draft layer's K/V
over the prompt: about 2% of a prefill at batch 16, measured, and prefill is 59% of a
batch-16 job here), but a prompt prefilled while AR rules, with no probe due before its row
can finish, skips that (``needs_context``). Nothing drafts for a row whose prompt the drafter
has not seen: until every row in the batch has been fed, calls run at L = 1 and a due probe
waits (at most a row's lifetime, ``lead``), so acceptance is only ever measured, and drafts
only ever made, from the context the drafter was trained on.

The drain is different. Once no request waits, the batch's remaining time is that of its
slowest row, and a speculative row's step count is random where AR's is not: a row with r
tokens to go needs about r / E[T] steps at L, give or take sqrt(r Var[T] / E[T]^3) (T: tokens
committed per step; renewal theory), and the slowest of n rows sits about z_n of those
spreads above the mean (z_n: the expected maximum of n standard normals). So in the drain
the policy picks the L with the least expected seconds to finish the batch, AR included
(``drain_seconds``), with no exploring. Across a million rows this changes little; in the
last wave of every decoder call it is what keeps a batch of 64 from waiting on its unluckiest
row at a block length that only paid on average.
"""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import numpy as np


@dataclasses.dataclass
class BlockPolicy:
    candidates: tuple[int, ...]
    explore_every: int = 1024  # decode steps between runs of the runner-up (a call is at most 16)
    step_seconds: dict[int, float] = dataclasses.field(default_factory=dict)  # by L, from warmup
    gated_seconds: dict[int, float] = dataclasses.field(default_factory=dict)  # a gated step's, by L
    trials: np.ndarray = dataclasses.field(init=False)  # [Lmax]: steps that could accept >= k
    successes: np.ndarray = dataclasses.field(init=False)  # [Lmax]: steps that accepted >= k
    calls: dict[int, int] = dataclasses.field(default_factory=dict)
    margin: float = 0.05  # a speculative L must promise the job (prefill included) this much more than AR
    drain_margin: float = 0.10  # in the drain, it must promise to finish the batch this much sooner
    prefill_seconds: float = 0.0  # the engine's time outside decode calls (prefill, mostly)
    run_seconds: dict[int, float] = dataclasses.field(default_factory=dict)  # decode calls' wall time, by L
    run_steps: dict[int, int] = dataclasses.field(default_factory=dict)
    exploring: bool = False  # whether the last choice was an exploration (the engine keeps it short)
    drain_calls: dict[int, int] = dataclasses.field(default_factory=dict)
    row_steps: dict[int, int] = dataclasses.field(default_factory=dict)  # row-steps run at L, by L
    gated_steps: dict[int, int] = dataclasses.field(default_factory=dict)  # of those, run as AR by the gate
    # Prompts prefilled with and without feeding the drafter's context (``needs_context``), where
    # the mode has a drafter: {"fed": n, "skipped": n}.
    context_prefills: dict[str, int] | None = None
    _steps_since_explore: int = 0

    def __post_init__(self):
        self.candidates = tuple(sorted(set(self.candidates)))
        top = self.candidates[-1]
        self.trials = np.zeros(top, np.int64)
        self.successes = np.zeros(top, np.int64)

    @property
    def largest(self) -> int:
        return self.candidates[-1]

    def set_warmup_costs(self, per_step: dict[int, list[float]], gated: dict[int, list[float]] | None = None) -> None:
        """Seconds per step by block length from warmup's timed calls, taken round-robin
        (``per_step[L][r]``: round r's call at L; ``gated[L][r]``: the same with every step
        gated, where L has a gate).

        Each L's cost relative to AR is the upper quartile of its same-round ratios to AR's
        call, times AR's best call: on a shared machine a slow spell inflates one round of every
        length, not every round of one length, so the ratios (what the choice rests on) survive
        it. The upper quartile, not the median, because the choice should err towards AR by as
        much as the ratios are uncertain: where they agree (an accelerator) it is their median,
        and on a 2-core CPU, where five rounds put L=2 at batch 8 anywhere from 1.29x to 1.46x
        AR (two jobs, measured) against 1.40x timed over 10 rounds of 8 steps, it leans to the
        dear side. Without AR among them, or with rounds missing, each L's best call.
        """
        ar = per_step.get(1) or []

        def relative(times: list[float]) -> float:
            if len(times) != len(ar):
                return min(times)
            return min(ar) * float(np.percentile([t / a for t, a in zip(times, ar)], 75))

        for block, times in per_step.items():
            if times:
                self.step_seconds[block] = relative(times)  # AR's own: its best call
        for block, times in (gated or {}).items():
            if times:
                self.gated_seconds[block] = relative(times)

    def observe(self, block: int, hist_delta: np.ndarray, gated: int = 0) -> None:
        """Adds the steps of one decode call. hist_delta [Lmax]: row-steps that committed i+1
        tokens; ``gated``: how many of them the per-step gate ran as AR steps (they committed
        one token and verified nothing, so they are no evidence of acceptance)."""
        if block < 2:
            return
        steps = int(hist_delta.sum())
        if steps == 0:
            return
        self.row_steps[block] = self.row_steps.get(block, 0) + steps
        self.gated_steps[block] = self.gated_steps.get(block, 0) + gated
        committed = np.arange(1, len(hist_delta) + 1)
        for k in range(1, block):
            self.trials[k] += steps - gated
            self.successes[k] += int(hist_delta[committed >= k + 1].sum())

    def gated_fraction(self, block: int) -> float:
        """The share of row-steps at this L that the gate ran as AR steps (0 before any)."""
        return self.gated_steps.get(block, 0) / self.row_steps[block] if self.row_steps.get(block) else 0.0

    def gate(self, block: int) -> float:
        """What the per-step gate of a call at this L weighs proposals against: the L-token
        pass's warmup cost relative to a gated step's (0 = always verify: no AR to fall back
        on, or no cost measured yet)."""
        if block < 2 or 1 not in self.candidates or block not in self.step_seconds or 1 not in self.step_seconds:
            return 0.0
        return self.step_seconds[block] / self.gated_seconds.get(block, self.step_seconds[1])

    def observe_cost(self, block: int, seconds: float, steps: int) -> None:
        """Adds one decode call's wall time and step count at block length ``block``."""
        if not self.exploring:  # an exploring call's steps (the last choice's) do not count
            self._steps_since_explore += steps
        if steps > 0:
            self.run_seconds[block] = self.run_seconds.get(block, 0.0) + seconds
            self.run_steps[block] = self.run_steps.get(block, 0) + steps

    def warmup_cost(self, block: int) -> float:
        """Warmup seconds per step of a call at this L: the L-token pass's, mixed with a gated
        step's in the share of steps the gate has run as AR so far."""
        g = self.gated_fraction(block)
        gated = self.gated_seconds.get(block, self.step_seconds.get(1, self.step_seconds[block]))
        return (1.0 - g) * self.step_seconds[block] + g * gated

    def observe_prefill(self, seconds: float) -> None:
        """Adds the engine's time spent prefilling prompts (and on the host) between decode calls."""
        self.prefill_seconds += seconds

    def decode_share(self) -> float:
        """The share of the engine's time spent in decode calls so far (1.0 before any)."""
        decode = sum(self.run_seconds.values())
        return decode / (decode + self.prefill_seconds) if decode > 0 else 1.0

    def required_gain(self) -> float:
        """How many times AR's decode tokens/s a speculative L must promise to be chosen: a
        decode gain r shortens a job with decode share s by the factor 1 - s + s / r, so a job
        gain of ``margin`` needs r >= s / (s - m / (1 + m)) (infinite where no r would do)."""
        s, m = self.decode_share(), self.margin
        return s / (s - m / (1 + m)) if s > m / (1 + m) else math.inf

    def slowdown(self) -> float:
        """How much slower decode calls have run than warmup measured, over every block length
        run (1.0 before any): the machine's own drift (a busy neighbour, host round trips),
        which every length shares."""
        warm = [b for b in self.run_steps if b in self.step_seconds]
        expected = sum(self.run_steps[b] * self.warmup_cost(b) for b in warm)
        return sum(self.run_seconds[b] for b in warm) / expected if expected > 0 else 1.0

    def cost(self, block: int) -> float:
        """Seconds per step at ``block``: its warmup cost scaled by the machine's drift since,
        the same drift for every length (see the module docstring). A length warmup did not
        time costs what its own calls took."""
        if block in self.step_seconds:
            return self.warmup_cost(block) * self.slowdown()
        return self.run_seconds.get(block, 0.0) / max(self.run_steps.get(block, 0), 1)

    def acceptance(self) -> np.ndarray:
        """q_k for k = 1..Lmax-1 (index k); unobserved k count as 0."""
        q = np.zeros(self.largest, np.float64)
        seen = self.trials > 0
        q[seen] = self.successes[seen] / self.trials[seen]
        return q

    def expected_tokens(self, block: int) -> float:
        """E[tokens per step | L]: the gated share of steps commits one token."""
        return 1.0 + (1.0 - self.gated_fraction(block)) * float(self.acceptance()[1:block].sum())

    def throughput(self, block: int) -> float:
        """Expected committed tokens per second per row at this block length."""
        return self.expected_tokens(block) / self.cost(block)

    def optimistic_tokens(self, block: int) -> float:
        """E[tokens per step | block] with every unobserved q_k as high as it can be: the
        last observed q (acceptance never rises with k), or 1 before anything is seen."""
        q, e, bound = self.acceptance(), 0.0, 1.0
        for k in range(1, block):
            if self.trials[k] > 0:
                bound = min(bound, q[k])
                e += q[k]
            else:
                e += bound
        return 1.0 + (1.0 - self.gated_fraction(block)) * e

    def optimistic_throughput(self, block: int) -> float:
        return self.optimistic_tokens(block) / self.cost(block)

    def tokens_variance(self, block: int) -> float:
        """Var[T] of the tokens T one step commits at this block length: P(T >= t) is q_(t-1)
        times the share of steps not gated (1 for t = 1), so E[T^2] = sum_t (2t - 1) P(T >= t)."""
        p = np.concatenate([[1.0], (1.0 - self.gated_fraction(block)) * self.acceptance()[1:block]])
        t = np.arange(1, block + 1)
        return float(((2 * t - 1) * p).sum() - p.sum() ** 2)

    def drain_seconds(self, block: int, rows: int, remaining: int) -> float:
        """Expected seconds until the slowest of ``rows`` active rows, the furthest with
        ``remaining`` tokens to go, finishes at this block length."""
        mean = self.expected_tokens(block)
        z = NormalDist().inv_cdf((rows - 0.375) / (rows + 0.25)) if rows > 1 else 0.0  # Blom's E[max]
        steps = remaining / mean + z * math.sqrt(remaining * self.tokens_variance(block) / mean**3)
        return steps * self.cost(block)

    def choose_drain(self, rows: int, remaining: int, ready: bool = True) -> int:
        """The block length for a call with no request waiting (see the module docstring);
        ``ready`` as for ``choose``."""
        self.exploring = False
        costed = [b for b in self.candidates if b in self.step_seconds or b in self.run_steps]
        if len(costed) < 2 or 1 not in costed or self.trials[1] == 0:
            return self.choose(ready)  # nothing to weigh yet (a call of no more rows than slots): explore
        best = min(costed, key=lambda b: self.drain_seconds(b, rows, remaining))
        margin = 1 + self.drain_margin
        if not ready or margin * self.drain_seconds(best, rows, remaining) > self.drain_seconds(1, rows, remaining):
            best = 1
        self.drain_calls[best] = self.drain_calls.get(best, 0) + 1
        self.calls[best] = self.calls.get(best, 0) + 1
        return best

    def _unobserved(self, block: int) -> bool:
        return bool(np.any(self.trials[1:block] == 0))

    def _best(self) -> int:
        """The L of the best expected throughput, AR unless a speculative L clears the margin."""
        best = max(self.candidates, key=self.throughput)
        if 1 in self.candidates and self.throughput(best) < self.required_gain() * self.throughput(1):
            best = 1
        return best

    def _unmeasured(self, best: int) -> list[int]:
        """Speculative lengths with an unobserved q_k whose optimistic throughput beats ``best``'s."""
        return [b for b in self.candidates
                if b > 1 and self._unobserved(b) and self.optimistic_throughput(b) > self.throughput(best)]

    def needs_context(self, lead: int) -> bool:
        """Whether a prompt prefilled now should feed the drafter's context: yes, unless AR rules
        and the next probe is more than ``lead`` decode steps away (``lead``: the most steps a
        row prefilled now can stay in the batch), so that nothing will draft for it. The
        drafter's prompt upkeep (``fc`` and every draft layer's K/V over the prompt) is about
        2% of a prefill, and prefill is most of a job at large batches (see the module
        docstring). A fixed L = 1 never drafts."""
        if len(self.candidates) == 1 or 1 not in self.candidates:
            return self.largest > 1
        best = self._best()
        return best > 1 or bool(self._unmeasured(best)) or self._steps_since_explore + lead >= self.explore_every

    def choose(self, ready: bool = True) -> int:
        """The block length of the next decode call. ``ready``: whether every row in the batch
        has its prompt in the drafter's context (``needs_context``); until then the call is an
        AR call, and a due probe waits, so that acceptance is measured, and drafting done, only
        where the drafter sees what it was trained to see."""
        self.exploring = False
        if len(self.candidates) == 1:
            block = self.largest
        else:
            best = self._best()
            # Walk upward: the smallest unmeasured L that could still pay. It is the cheapest
            # call, and what it measures (q_1..q_{L-1}) bounds every larger L's optimism.
            unmeasured = self._unmeasured(best)
            # Periodically, the runner-up runs once: its acceptance may have changed since it
            # was last measured.
            runner_up = max((b for b in self.candidates if b != best), key=self.optimistic_throughput)
            self.exploring = ready and (bool(unmeasured) or self._steps_since_explore >= self.explore_every)
            if self.exploring:
                self._steps_since_explore = 0
            if self.exploring:
                block = unmeasured[0] if unmeasured else runner_up
            else:
                block = best if ready else 1
        self.calls[block] = self.calls.get(block, 0) + 1
        return block

    def report(self) -> dict:
        """What was measured and chosen, and why: for the job stats."""
        costed = [b for b in self.candidates if b in self.step_seconds or b in self.run_steps]
        return {
            "candidates": list(self.candidates),
            "step_ms": {str(b): round(s * 1e3, 3) for b, s in sorted(self.step_seconds.items())},
            "gated_step_ms": {str(b): round(s * 1e3, 3) for b, s in sorted(self.gated_seconds.items())},
            "step_ms_refined": {str(b): round(self.cost(b) * 1e3, 3) for b in costed},
            "decode_share": round(self.decode_share(), 3),
            "required_gain_over_ar": round(self.required_gain(), 3),
            "acceptance_q": [round(float(x), 4) for x in self.acceptance()[1:]],
            "expected_tokens_per_step": {str(b): round(self.expected_tokens(b), 3) for b in self.candidates},
            "expected_tokens_per_s_per_row": {str(b): round(self.throughput(b), 2) for b in costed},
            "decode_calls_by_block": {str(b): n for b, n in sorted(self.calls.items())},
            "drain_calls_by_block": {str(b): n for b, n in sorted(self.drain_calls.items())},
            "gated_fraction_by_block": {str(b): round(self.gated_fraction(b), 3) for b in sorted(self.row_steps)},
            **({"drafter_context_prefills": dict(self.context_prefills)} if self.context_prefills is not None else {}),
        }
