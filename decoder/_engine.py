"""The host loop that keeps a static batch of slots full.

Requests stream in; each free slot is prefilled with the next one; the jitted
decode phase runs until some row finishes (when more requests wait) or for a
fixed number of steps; finished rows are emitted and their slots refilled.
Shapes never change after warmup, so nothing recompiles.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dflash_batch.decoder._autoblock import BlockPolicy
from dflash_batch.decoder._requests import Request, Result
from dflash_batch.decoder._sampling import row_key
from dflash_batch.decoder._slots import Slots

DEFAULT_PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048)
# A call that tries a block length only to measure acceptance runs EXPLORE_STEPS steps, or
# more at small batches, so that it sees at least EXPLORE_ROW_STEPS row-steps. At batch 1, four
# steps judge q_1 on four tokens; probes that measured q_1 = 0.30 on about eight kept n-gram
# drafting at AR for a whole bench, where runs that drafted have measured q_1 = 0.48.
EXPLORE_STEPS = 4
EXPLORE_ROW_STEPS = 16
WARMUP_STEPS = 4  # decode steps of each timed warmup call
WARMUP_ROUNDS = 5  # timed warmup calls per block length, when the block length is chosen automatically
# Decode steps of a call when no row finishes sooner: the host sees the batch this often (a
# round trip of about a millisecond against 16 steps of 30-100 ms on a CPU).
CHUNK_STEPS = 16
GATE_NEVER_PAYS = 1e9  # a gate no proposal clears: every step of the call runs as AR
# Requests a decoder call gets per slot by default (a job's rows_per_batch = this x batch_size):
# the slots stay full until the last batch_size rows, which drain with nothing to refill them.
ROWS_PER_SLOT = 4


def falls_back_to_ar(blocks: Sequence[int]) -> bool:
    """Whether decode calls over these block lengths gate each step (an automatic length, AR
    among the candidates): a step whose proposals cannot pay runs as an AR step."""
    return len(blocks) > 1 and 1 in blocks


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length`` tokens."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"prompt of {length} tokens is longer than the largest bucket {buckets[-1]}")


@dataclasses.dataclass
class Phases:
    """The jitted functions of one decode mode, bound to their static arguments.

    prefill(state, tokens [1, P], start, length, slot, budget, temperature, top_p, key, feed=True) -> state
        (one fixed-size chunk of a prompt; the last chunk opens the slot; ``feed``: whether a
        drafter's context takes the prompt, where the mode has one (``drafter_context``))
    decode(state, stop_on_first_done, block, max_steps, gate) -> (state, steps_run)
        (gate: the block's pass cost relative to a 1-token pass, for the per-step fallback to
        AR of an automatic block length; 0 = always verify)
    """

    prefill: Callable
    decode: Callable
    init_state: Callable[[], Slots]
    blocks: tuple[int, ...] = (1,)  # block lengths decode may be called with; several = automatic choice
    drafter_context: bool = False  # the mode has a drafter, whose context prefill may leave unfed


class SlotEngine:
    """Runs requests through one static batch (B slots, cache length S)."""

    def __init__(self, phases: Phases, tokenizer, max_prompt_len: int, capacity: int, prefill_chunk: int,
                 chunk_steps: int = CHUNK_STEPS):
        self.phases = phases
        self.tokenizer = tokenizer
        self.max_prompt_len = max_prompt_len
        self.capacity = capacity
        self.prefill_chunk = prefill_chunk
        self.chunk_steps = chunk_steps
        self.state: Slots | None = None
        self.compile_seconds = 0.0
        self.policy = BlockPolicy(phases.blocks)
        if phases.drafter_context:
            self.policy.context_prefills = {"fed": 0, "skipped": 0}

    def warmup(self) -> float:
        """Compiles prefill and every decode block length (once), and when the block length is
        chosen automatically, measures each one's seconds per step at this batch size."""
        if self.state is not None:
            return 0.0
        t0 = time.perf_counter()
        s = self.phases.init_state()
        b, p = s.batch, self.prefill_chunk
        # Slot 0 first without feeding a drafter (that variant compiles too), then fed like every slot.
        variants = [(0, False)] if self.phases.drafter_context else []
        for slot, feed in variants + [(i, True) for i in range(b if len(self.phases.blocks) > 1 else 1)]:
            s = self.phases.prefill(s, np.full((1, p), 3, np.int32), np.int32(0), np.int32(p), np.int32(slot),
                                    np.int32(2), np.float32(0), np.float32(1), row_key(slot), feed=feed)
        blocks = self.phases.blocks

        def timed(s: Slots, block: int, n_steps: int, gate: float = 0.0) -> tuple[Slots, float | None]:
            budget = min(self.capacity, 1 + WARMUP_STEPS * block)
            s = s.replace(pos=jnp.full((b,), p, jnp.int32), n_out=jnp.ones((b,), jnp.int32),
                          budget=jnp.full((b,), budget, jnp.int32), done=jnp.zeros((b,), bool))
            jax.block_until_ready(s.pos)
            t1 = time.perf_counter()
            s, steps = self.phases.decode(s, jnp.asarray(True), block, np.int32(n_steps), gate)
            steps = int(steps)
            return s, (time.perf_counter() - t1) / steps if steps else None

        for block in blocks:  # compile
            s, _ = timed(s, block, 1)
        # Then short timed calls, round-robin over the block lengths, so that a slow spell of a
        # shared machine falls on every length alike (see BlockPolicy.set_warmup_costs). Where
        # a step may fall back to AR (an automatic length), a call whose every step falls back
        # is timed too: such a step still makes the proposal it weighed.
        gated = falls_back_to_ar(blocks)
        per_step: dict[int, list[float]] = {block: [] for block in blocks}
        per_gated: dict[int, list[float]] = {block: [] for block in blocks if gated and block > 1}
        for _ in range(WARMUP_ROUNDS if len(blocks) > 1 else 1):
            for block in blocks:
                s, seconds = timed(s, block, WARMUP_STEPS)
                if seconds is not None:
                    per_step[block].append(seconds)
                if block in per_gated:
                    s, seconds = timed(s, block, WARMUP_STEPS, GATE_NEVER_PAYS)
                    if seconds is not None:
                        per_gated[block].append(seconds)
        self.policy.set_warmup_costs(per_step, per_gated)
        self.state = self.phases.init_state()
        dt = time.perf_counter() - t0
        self.compile_seconds += dt
        return dt

    def _prefill(self, slot: int, req: Request, feed: bool = True) -> None:
        n, c = len(req.token_ids), self.prefill_chunk
        if n > self.max_prompt_len:
            raise ValueError(f"request {req.id!r}: {n} prompt tokens exceed this batch's limit {self.max_prompt_len}")
        if req.max_new_tokens > self.capacity:
            raise ValueError(f"request {req.id!r}: {req.max_new_tokens=} exceeds the engine capacity {self.capacity}")
        padded = np.zeros((-(-n // c)) * c, np.int32)
        padded[:n] = req.token_ids
        key = row_key(req.seed)
        for start in range(0, n, c):
            self.state = self.phases.prefill(
                self.state, padded[None, start : start + c], np.int32(start), np.int32(n), np.int32(slot),
                np.int32(req.max_new_tokens), np.float32(req.temperature), np.float32(req.top_p), key, feed=feed)

    def run(self, requests: Iterable[Request], ticks: bool = False) -> Iterator[Result | None]:
        """Decodes every request, yielding each result as soon as its row finishes; with
        ``ticks``, also None after every prompt prefilled and every decode call (the bench's
        turns: configurations run side by side then take turns of about a second)."""
        if self.state is None:
            self.warmup()
        assert self.state is not None
        queue = iter(requests)
        lookahead: deque[Request] = deque()

        def pop() -> Request | None:
            if lookahead:
                return lookahead.popleft()
            return next(queue, None)

        def more() -> bool:
            if not lookahead:
                nxt = next(queue, None)
                if nxt is None:
                    return False
                lookahead.append(nxt)
            return True

        b = self.state.batch
        rows: list[tuple[Request, float, int] | None] = [None] * b
        seen_hist = np.zeros(self.state.hist.shape, np.int64)  # per-slot histogram already observed
        seen_gated = int(_gated(self.state))  # row-steps the per-step gate ran as AR, already observed
        produced = np.zeros((b,), np.int64)  # completion tokens per slot so far
        fed = np.ones((b,), bool)  # whether the slot's prompt is in the drafter's context
        explore_steps = max(EXPLORE_STEPS, -(-EXPLORE_ROW_STEPS // b))
        while True:
            t_fill = time.perf_counter()  # prefill (and the host) until the decode call starts
            # The policy does not change while slots refill: one answer for every prompt prefilled now.
            feed = not self.phases.drafter_context or self.policy.needs_context(lead=self.capacity)
            for i in range(b):
                if rows[i] is None:
                    req = pop()
                    if req is None:
                        break
                    t0 = time.perf_counter()
                    fed[i] = feed
                    if self.phases.drafter_context:
                        self.policy.context_prefills["fed" if feed else "skipped"] += 1
                    self._prefill(i, req, feed)
                    seen_hist[i] = 0
                    produced[i] = 1  # prefill samples the first completion token
                    rows[i] = (req, t0, self.max_prompt_len)
                    if ticks:
                        jax.block_until_ready(self.state)  # a turn ends when its work has run
                        self.policy.observe_prefill(time.perf_counter() - t_fill)
                        yield None
                        t_fill = time.perf_counter()
            if all(r is None for r in rows):
                return
            waiting = more()
            # Drafting only where every row's prompt is in the drafter's context (see BlockPolicy.choose).
            ready = all(fed[i] for i, r in enumerate(rows) if r is not None)
            if waiting:
                block = self.policy.choose(ready)
            else:  # the drain: the batch now waits on its slowest row
                left = [r[0].max_new_tokens - produced[i] for i, r in enumerate(rows) if r is not None]
                block = self.policy.choose_drain(len(left), max(max(left), 1), ready)
            # An exploring call runs only a few steps: it is there to measure acceptance.
            steps = explore_steps if self.policy.exploring else self.chunk_steps
            # Prefill is dispatched asynchronously: wait for it, or the decode call's wall time
            # (which refines the policy's cost of this block length) would include it.
            jax.block_until_ready(self.state)
            t_call = time.perf_counter()
            self.policy.observe_prefill(t_call - t_fill)  # the decode gain's share of a job: see BlockPolicy
            self.state, ran = self.phases.decode(self.state, jnp.asarray(waiting), block, np.int32(steps),
                                                 self.policy.gate(block))
            done, n_out, hist, ran, gated = jax.device_get((self.state.done, self.state.n_out, self.state.hist, ran,
                                                           _gated(self.state)))
            produced = np.array(n_out, np.int64)
            self.policy.observe_cost(block, time.perf_counter() - t_call, int(ran))
            self.policy.observe(block, (hist - seen_hist).sum(axis=0), int(gated) - seen_gated)
            seen_hist, seen_gated = hist.astype(np.int64), int(gated)
            need_out = [i for i, r in enumerate(rows) if r is not None and (done[i] or r[0].stop)]
            out = jax.device_get(self.state.out) if need_out else None
            for i in need_out:
                req, t0, bucket = rows[i]
                tokens = [int(t) for t in out[i, : n_out[i]]]
                stopped = _truncate_at_stop(self.tokenizer, tokens, req.stop) if req.stop else None
                if stopped is None and not done[i]:
                    continue
                if stopped is not None and not done[i]:
                    done = done.copy()
                    done[i] = True  # host-side edit: an eager .at[] update would compile a kernel
                    self.state = self.state.replace(done=jnp.asarray(done))
                yield self._result(i, req, t0, bucket, tokens, stopped)
                rows[i] = None
            if ticks:
                yield None

    def _result(self, i: int, req: Request, t0: float, bucket: int, tokens: list[int],
                stopped: tuple[list[int], str] | None) -> Result:
        # Whole small arrays to the host, then index there: no per-shape eager kernels.
        hist, drafted, accepted, eos = (a[i] for a in jax.device_get(
            (self.state.hist, self.state.drafted, self.state.accepted, self.state.eos)))
        if stopped is not None:
            tokens, text = stopped
            reason = "stop"
        else:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer else ""
            reason = "eos" if eos else "length"
        return Result(
            id=req.id, prompt_tokens=len(req.token_ids), token_ids=tokens, text=text, finish_reason=reason,
            decode_steps=int(hist.sum()), accepted_per_step=np.asarray(hist, np.int64),
            draft_tokens_proposed=int(drafted), draft_tokens_accepted=int(accepted),
            decode_seconds=time.perf_counter() - t0, bucket=bucket)


def _gated(state: Slots) -> jax.Array:
    """Row-steps so far that a speculative call's gate ran as plain AR steps (0 without a gate)."""
    stats = getattr(state.extra, "stats", None)
    return jnp.int32(0) if stats is None else stats.gated


def _truncate_at_stop(tokenizer, tokens: list[int], stops: Sequence[str]) -> tuple[list[int], str] | None:
    """If the decoded text contains a stop string, the shortest token prefix that
    reaches it and the text before the stop string; else None."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if not hits:
        return None
    at, stop = min(hits)
    for k in range(1, len(tokens) + 1):
        if stop in tokenizer.decode(tokens[:k], skip_special_tokens=True):
            return tokens[:k], text[:at]
    return tokens, text[:at]
