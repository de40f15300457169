"""The host loop that keeps a static batch of slots full.

Requests stream in; each free slot is prefilled with the next one (``BatchRun.refill``); the
jitted decode phase runs until some row finishes (when more requests wait) or for a fixed
number of steps (``decode``); finished rows are emitted and their slots refilled (``harvest``).
Shapes never change after warmup, so nothing recompiles.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dflash_batch.decoder._autoblock import BlockPolicy
from dflash_batch.decoder._cost_table import load_costs, save_costs, stored_seconds
from dflash_batch.decoder._lazy_blocks import merge_costs, next_wanted, park, unpark
from dflash_batch.decoder._mesh import active, is_sharded, replicated, shardings, state_specs
from dflash_batch.decoder._requests import Request, Result
from dflash_batch.decoder._sampling import row_key
from dflash_batch.decoder._slots import Slots

# A call that tries a block length only to measure acceptance runs EXPLORE_STEPS steps, or
# more at small batches, so that it judges acceptance on at least EXPLORE_ROW_STEPS row-steps.
EXPLORE_STEPS = 4
EXPLORE_ROW_STEPS = 16
WARMUP_STEPS = 2  # decode steps of each timed warmup call (its rounds average the noise out)
WARMUP_ROUNDS = 3  # timed warmup calls per block length, when the block length is chosen automatically
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

    prefill(state, tokens [1, P], start, length, slot, budget, temperature, top_p, key) -> state
        (one fixed-size chunk of a prompt; the last chunk opens the slot)
    decode(state, *, stop_on_first_done, max_steps, gate, block) -> (state, steps_run)
        (gate: the block's pass cost in AR steps, for the per-step fallback to AR of an
        automatic block length; 0 = always verify)
    """

    prefill: Callable
    decode: Callable
    init_state: Callable[[], Slots]
    blocks: tuple[int, ...] = (1,)  # block lengths decode may be called with; several = automatic choice


def bind_phases(prefill: Callable, decode: Callable, init_state: Callable, params, drafter, mesh=None,
                **kw) -> Phases:
    """A decode mode's jitted phases with their weights bound, on one device or on a mesh.

    prefill(params, drafter, state, tokens, start, length, slot, budget, temperature, top_p, key) -> state
    decode(params, drafter, state, stop_on_first_done, max_steps, gate, block) -> (state, steps_run),
      positional (a sharded jit places positional arguments only); the bound ``Phases.decode``
      takes them by keyword. ``kw``: the remaining ``Phases`` fields.

    On one device the phases are called as they are. On a mesh each phase is wrapped in a jit
    whose input and output shardings are the state's own (``_mesh.state_specs``), so that:
      * the slot state is created already sharded (``init_state`` is a jitted zeros function
        with ``out_shardings``): no host copy, and no chip holds a whole cache;
      * every call returns the state in the layout it came in, so nothing recompiles after
        warmup;
      * arrays the host puts into the state (the engine's edits of ``done``, ``pos``, ...) are
        moved into that layout on the way in (a no-op for the others), again without a new
        compilation.
    The mesh is active while the phases trace, for sampling's sharding constraint and the
    kernels' ``shard_map``.
    """
    if not is_sharded(mesh):
        return Phases(
            prefill=lambda s, *args: prefill(params, drafter, s, *args),
            decode=lambda s, *, stop_on_first_done, max_steps, gate, block: decode(
                params, drafter, s, stop_on_first_done, max_steps, np.float32(gate), block),
            init_state=init_state, **kw)
    state_sh = shardings(state_specs(jax.eval_shape(init_state)), mesh)
    p_sh = jax.tree.map(lambda a: a.sharding, params)
    d_sh = jax.tree.map(lambda a: a.sharding, drafter)
    rep = replicated(mesh)
    init_j = jax.jit(init_state, out_shardings=state_sh)
    prefill_j = jax.jit(prefill, donate_argnums=(2,), in_shardings=(p_sh, d_sh, state_sh) + (rep,) * 8,
                        out_shardings=state_sh)
    decode_j = jax.jit(decode, static_argnums=(6,), donate_argnums=(2,),
                       in_shardings=(p_sh, d_sh, state_sh, rep, rep, rep), out_shardings=(state_sh, rep))

    # Arrays the host put into the state are placed first: a traced call's cache key includes
    # its arguments' shardings, so an unplaced array would trace (and compile) it again.
    def run_prefill(s, *args):
        with active(mesh):
            return prefill_j(params, drafter, jax.device_put(s, state_sh), *args)

    def run_decode(s, *, stop_on_first_done, max_steps, gate, block):
        with active(mesh):
            return decode_j(params, drafter, jax.device_put(s, state_sh), stop_on_first_done, max_steps,
                            np.float32(gate), block)

    def run_init():
        with active(mesh):
            return init_j()

    return Phases(prefill=run_prefill, decode=run_decode, init_state=run_init, **kw)


class StateHolder:
    """The one slot state a decoder holds, lent to one engine (bucket) at a time.

    Engines of other buckets keep their compiled programs but no state: an engine that needs
    one first releases the state held (``claim``), then allocates its own, so at no moment are
    two states alive. What a state has learnt that outlives a batch (the proposal statistics)
    is kept on the host and handed back when the engine holds a state again.
    """

    def __init__(self):
        self.owner: SlotEngine | None = None
        self.state: Slots | None = None

    def claim(self, engine: "SlotEngine | None") -> None:
        """Releases the state held, whoever holds it: ``engine`` is about to allocate one (None:
        nobody is)."""
        if self.owner is not None and self.state is not None:
            self.owner.kept_stats = _host_stats(self.state)
        self.owner, self.state = engine, None


class SlotEngine:
    """Runs requests through one static batch (B slots, cache length S).

    ``holder``: the state holder this engine shares with the other buckets' engines of its
    decoder (default: one of its own). ``cost_key`` names the compiled programs for the stored
    cost measurements (``_cost_table``); None measures at every warmup.
    """

    def __init__(self, phases: Phases, tokenizer, max_prompt_len: int, capacity: int, prefill_chunk: int,
                 chunk_steps: int, holder: StateHolder | None = None, cost_key: str | None = None):
        self.phases = phases
        self.tokenizer = tokenizer
        self.max_prompt_len = max_prompt_len
        self.capacity = capacity
        self.prefill_chunk = prefill_chunk
        self.chunk_steps = chunk_steps
        self.holder = holder or StateHolder()
        self.warm = False
        self.kept_stats = None  # the proposal statistics of a released state (host arrays)
        self.cost_key = cost_key
        self.compile_seconds = 0.0
        # Warmup's seconds by what they went to: each program's compile (or load from the
        # persistent cache), and the timing of the candidate block lengths.
        self.warmup_seconds: dict[str, float] = {}
        self.costs_source = ""  # "measured" or "stored" (an earlier warmup's, same programs and machine)
        self.policy = BlockPolicy(phases.blocks)
        self.add_seconds = 0.0  # what readying the last block length took: compile and costs
        # What ``ready_seconds`` read from the cost store, read once per run (not once per decode call):
        self._costs_stored: dict[int, bool] = {}  # by length: whether its costs (and so its programs) are here
        self._cold_seconds: float | None = None  # what the first speculative length took cold

    @property
    def state(self) -> Slots | None:
        """This engine's slot state, or None while another bucket holds the decoder's state."""
        return self.holder.state if self.holder.owner is self else None

    @state.setter
    def state(self, state: Slots | None) -> None:
        if self.holder.owner is self:
            self.holder.state = state
        elif state is not None:
            self.holder.claim(self)
            self.holder.state = state

    def fresh_state(self) -> Slots:
        """A zeroed state for this engine, allocated after releasing the one held (this engine's
        or another bucket's), with the proposal statistics it had learnt."""
        self.holder.claim(self)
        s = self.phases.init_state()
        if self.kept_stats is not None:
            s = s.replace(extra=s.extra.replace(stats=jax.tree.map(jnp.asarray, self.kept_stats)))
        return s

    def warmup(self, lazy: bool = False) -> float:
        """Readies the batch; returns the seconds it took.

        1. Compile prefill, then each decode block length with a call of zero steps, which
           compiles (or loads from the persistent cache) without running a step. ``lazy``:
           only AR and the smallest speculative length of an automatic one; each larger
           candidate waits until the policy could want it (``add_wanted_block``).
        2. With an automatic block length, the compiled candidates' step costs: stored ones for
           these programs on this machine, else timed side by side at this batch size (and stored).
        3. The scratch state is dropped before the batch's own is made, so warmup holds one
           state at its peak, as decoding does (its statistics came from dummy tokens).
        """
        if self.warm:
            return 0.0
        t0 = time.perf_counter()
        s = self._prefill_slots(self.fresh_state(), 1)
        jax.block_until_ready(s.pos)
        self.warmup_seconds["prefill"] = time.perf_counter() - t0
        blocks = self.phases.blocks[:2] if lazy else self.phases.blocks
        s = self._compile_blocks(s, blocks)
        if len(self.phases.blocks) > 1:
            self._cost_blocks(s, blocks)
            self.add_seconds = self.warmup_seconds[f"decode L={blocks[-1]}"] + self.warmup_seconds["block costs"]
        del s
        self.kept_stats = None
        self.state = self.fresh_state()
        self.warm = True
        dt = time.perf_counter() - t0
        self.compile_seconds += dt
        return dt

    def add_wanted_block(self, work_left: float | None = None) -> float:
        """After a lazy warmup: compiles and times the next candidate block length once the
        policy could want it and, with ``work_left`` (tokens per slot) known, once it could pay
        back what adding a length costs (``_lazy_blocks.next_wanted``); returns the seconds it took.

        1. Park the batch's state on the host, so that the scratch state of step 2 is the one
           state on the devices (the memory plan counts one).
        2. Compile the candidate and time it beside AR on a scratch state (or load its stored
           costs), as warmup does.
        3. Put the parked state back, bit for bit: the rows decode on as if nothing happened.
        """
        block = (next_wanted(self.policy, work_left, self.ready_seconds)
                 if self.warm and self.state is not None else None)
        if block is None:
            return 0.0
        t0 = time.perf_counter()
        parked, placement = park(self.state)
        kept, self.state = self.kept_stats, None  # the live state's last reference: its memory is free
        s = self._compile_blocks(self._prefill_slots(self.fresh_state(), 1), (block,))
        self._cost_blocks(s, (1, block))
        del s
        self.state, self.kept_stats = unpark(parked, placement), kept
        dt = time.perf_counter() - t0
        self.compile_seconds += dt
        self.add_seconds = dt
        return dt

    def _compile_blocks(self, s: Slots, blocks: Sequence[int]) -> Slots:
        """``s`` after a zero-step decode call at each of ``blocks``: each program compiled."""
        for block in blocks:
            t1 = time.perf_counter()
            s, steps = self.phases.decode(s, stop_on_first_done=jnp.asarray(True), max_steps=np.int32(0), gate=0.0,
                                          block=block)
            jax.block_until_ready(steps)
            del steps  # nothing of the scratch run may outlive it (the plan counts one state)
            self.warmup_seconds[f"decode L={block}"] = time.perf_counter() - t1
        return s

    def _cost_blocks(self, s: Slots, blocks: Sequence[int]) -> None:
        """Gives the policy the step costs of ``blocks`` (AR among them): stored ones, else
        timed on the scratch state ``s`` (and stored under a key naming the lengths timed together)."""
        t1 = time.perf_counter()
        key = self._costs_key(blocks)
        stored = load_costs(key) if key else None
        per_step, per_gated = stored or self._time_blocks(s, blocks)
        if stored is None and key:  # with what readying the largest took (compile, then timing)
            save_costs(key, per_step, per_gated,
                       self.warmup_seconds[f"decode L={max(blocks)}"] + time.perf_counter() - t1)
        self._costs_stored[max(blocks)] = key is not None
        first = not self.policy.costs
        if first:
            self.policy.set_costs(per_step, per_gated)
            self.costs_source = "stored" if stored else "measured"
        else:
            merge_costs(self.policy, per_step, per_gated)
        label = "block costs" if first else f"block costs L={max(blocks)}"
        self.warmup_seconds[label] = time.perf_counter() - t1

    def _costs_key(self, blocks: Sequence[int]) -> str | None:
        """Where the costs of ``blocks`` timed together are stored (None: nowhere)."""
        return f"{self.cost_key}-L{'-'.join(map(str, blocks))}" if self.cost_key else None

    def ready_seconds(self, block: int) -> float:
        """What readying ``block`` would likely take: as the last length did where its costs are
        stored (its programs were compiled here before, so the persistent cache holds them),
        else no less than the first speculative length took when first compiled, cold (stored
        with its costs by the run that measured them)."""
        key = self._costs_key((1, block))
        if key is None:
            return self.add_seconds
        if block not in self._costs_stored:
            self._costs_stored[block] = load_costs(key) is not None
        if self._costs_stored[block]:
            return self.add_seconds
        if self._cold_seconds is None:
            self._cold_seconds = stored_seconds(self._costs_key(self.phases.blocks[:2])) or 0.0
        return max(self.add_seconds, self._cold_seconds)

    def _prefill_slots(self, s: Slots, n: int) -> Slots:
        """``s`` with its first ``n`` slots prefilled with one chunk of a dummy prompt."""
        p = self.prefill_chunk
        for slot in range(n):
            s = self.phases.prefill(s, np.full((1, p), 3, np.int32), np.int32(0), np.int32(p), np.int32(slot),
                                    np.int32(2), np.float32(0), np.float32(1), row_key(slot))
        return s

    def _time_blocks(self, s: Slots, blocks: Sequence[int]) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
        """Seconds per step of each of ``blocks``, per round, on the warm scratch state ``s``
        (every slot prefilled first); where a step may fall back to AR, also of calls whose
        every step does (they still propose)."""
        b, p = s.batch, self.prefill_chunk
        s = self._prefill_slots(s, b)

        def timed(s: Slots, block: int, gate: float = 0.0, steps: int = WARMUP_STEPS) -> tuple[Slots, float | None]:
            budget = min(self.capacity, 1 + steps * block)
            s = s.replace(pos=jnp.full((b,), p, jnp.int32), n_out=jnp.ones((b,), jnp.int32),
                          budget=jnp.full((b,), budget, jnp.int32), done=jnp.zeros((b,), bool))
            jax.block_until_ready(s.pos)
            t1 = time.perf_counter()
            s, steps = self.phases.decode(s, stop_on_first_done=jnp.asarray(True), max_steps=np.int32(steps),
                                          gate=gate, block=block)
            steps = int(steps)
            return s, (time.perf_counter() - t1) / steps if steps else None

        for block in blocks:  # a program's first run pays one-time costs: never in a timed round
            s, _ = timed(s, block, steps=1)
        # Round-robin, so that a slow spell of a shared machine falls on every length alike.
        gated = falls_back_to_ar(self.phases.blocks)
        per_step: dict[int, list[float]] = {block: [] for block in blocks}
        per_gated: dict[int, list[float]] = {block: [] for block in blocks if gated and block > 1}
        for _ in range(WARMUP_ROUNDS):
            for block in blocks:
                s, seconds = timed(s, block)
                per_step[block] += [seconds] if seconds is not None else []
                if block in per_gated:
                    s, seconds = timed(s, block, GATE_NEVER_PAYS)
                    per_gated[block] += [seconds] if seconds is not None else []
        return per_step, per_gated

    def start(self, requests: Iterable[Request], rows_after: int | None = None) -> "BatchRun":
        """A run of these requests through the batch, driven step by step (``BatchRun``)."""
        if not self.warm:
            self.warmup()
        if self.state is None:
            self.state = self.fresh_state()
        return BatchRun(self, requests, rows_after)


class BatchRun:
    """One stream of requests through an engine's slots, in named steps:

    1. ``refill``: prefill free slots with the next requests;
    2. ``decode``: the policy picks the block length, and one decode call runs on the device
       until a row finishes (while requests wait) or for ``chunk_steps`` steps;
    3. ``harvest``: finished rows (EOS, budget, or a stop string) become results, freeing slots.
    """

    def __init__(self, engine: SlotEngine, requests: Iterable[Request], rows_after: int | None = None):
        """``rows_after``: rows the same decoder may still get after these (None: unknown). With
        a list of requests and a known ``rows_after``, the work left is known (``work_left``)."""
        self.engine = engine
        sized = isinstance(requests, Sequence) and rows_after is not None
        self._queued_tokens = sum(r.max_new_tokens for r in requests) if sized else None
        mean_new = self._queued_tokens / len(requests) if sized and requests else 0.0
        self._later_tokens = rows_after * mean_new if sized else None
        self._queue = iter(requests)
        self._next: Request | None = next(self._queue, None)
        b = engine.state.batch
        self.rows: list[tuple[Request, float] | None] = [None] * b  # request and start time per slot
        self._seen_hist = np.zeros(engine.state.hist.shape, np.int64)  # per slot, already given to the policy
        self._seen_gated = int(_gated(engine.state))
        self._probe_steps = max(EXPLORE_STEPS, -(-EXPLORE_ROW_STEPS // b))
        self._done, self._n_out = np.zeros((b,), bool), np.zeros((b,), np.int32)  # as of the last decode call

    def results(self) -> Iterator[Result]:
        """Runs the steps until every request is decoded, yielding each result as its row finishes."""
        while self.refill() or self.busy:
            self.decode()
            yield from self.harvest()

    @property
    def busy(self) -> bool:
        """Whether any slot holds a row still decoding."""
        return any(r is not None for r in self.rows)

    def _check_held(self) -> None:
        if self.engine.state is None:  # a decoder holds one state: another bucket's batch took it
            raise RuntimeError(f"the batch of bucket {self.engine.max_prompt_len} lost its slot state: another "
                               "bucket's batch started on the same decoder before this one finished")

    def refill(self, limit: int | None = None) -> int:
        """Prefills free slots (at most ``limit``) with waiting requests; returns how many."""
        self._check_held()
        filled = 0
        for i, row in enumerate(self.rows):
            if self._next is None or (limit is not None and filled >= limit):
                break
            if row is None:
                req, self._next = self._next, next(self._queue, None)
                self.rows[i] = (req, time.perf_counter())
                self._n_out[i] = 0
                if self._queued_tokens is not None:
                    self._queued_tokens -= req.max_new_tokens
                self._prefill(i, req)
                self._seen_hist[i] = 0
                filled += 1
        return filled

    def _prefill(self, slot: int, req: Request) -> None:
        e, n = self.engine, len(req.token_ids)
        if n > e.max_prompt_len:
            raise ValueError(f"request {req.id!r}: {n} prompt tokens exceed this batch's limit {e.max_prompt_len}")
        if req.max_new_tokens > e.capacity:
            raise ValueError(f"request {req.id!r}: {req.max_new_tokens=} exceeds the engine capacity {e.capacity}")
        c = e.prefill_chunk
        padded = np.zeros((-(-n // c)) * c, np.int32)
        padded[:n] = req.token_ids
        for start in range(0, n, c):
            e.state = e.phases.prefill(
                e.state, padded[None, start : start + c], np.int32(start), np.int32(n), np.int32(slot),
                np.int32(req.max_new_tokens), np.float32(req.temperature), np.float32(req.top_p), row_key(req.seed))

    def decode(self) -> None:
        """One decode call at the policy's block length; its outcome goes back to the policy."""
        self._check_held()
        e = self.engine
        e.add_wanted_block(self.work_left())  # after a lazy warmup: a larger block length, once it could pay
        block, trial = e.policy.choose()
        steps = self._probe_steps if trial else e.chunk_steps  # a trial only measures acceptance
        e.state, _ = e.phases.decode(e.state, stop_on_first_done=jnp.asarray(self._next is not None),
                                     max_steps=np.int32(steps), gate=e.policy.gate(block), block=block)
        # One host round trip per call: what the policy learns and what ``harvest`` reads.
        hist, gated, self._done, n_out = jax.device_get(
            (e.state.hist, _gated(e.state), e.state.done, e.state.n_out))
        self._n_out = np.array(n_out)  # writable: a slot refilled before the next call starts at 0
        e.policy.observe(block, (hist - self._seen_hist).sum(axis=0), int(gated) - self._seen_gated)
        self._seen_hist, self._seen_gated = hist.astype(np.int64), int(gated)

    def work_left(self) -> float | None:
        """Tokens each slot still has to decode, at most (every row to its budget), or None where
        the requests are a stream or the rows after them unknown: the running rows' remaining
        budgets, the queued and later rows' spread over the slots, and never less than the
        longest running row's."""
        if self._queued_tokens is None:
            return None
        running = [r[0].max_new_tokens - int(self._n_out[i]) for i, r in enumerate(self.rows) if r is not None]
        total = sum(running) + self._queued_tokens + self._later_tokens
        return max(total / len(self.rows), max(running, default=0))

    def harvest(self) -> list[Result]:
        """The rows that finished in the last decode call, as results; their slots are free again."""
        e = self.engine
        done, n_out, hist = self._done, self._n_out, self._seen_hist
        ended = [i for i, r in enumerate(self.rows) if r is not None and (done[i] or r[0].stop)]
        if not ended:
            return []
        out, drafted, accepted, eos = jax.device_get((e.state.out, e.state.drafted, e.state.accepted, e.state.eos))
        results, stopped_rows = [], []
        for i in ended:
            req, t0 = self.rows[i]
            tokens = [int(t) for t in out[i, : n_out[i]]]
            stopped = _truncate_at_stop(e.tokenizer, tokens, req.stop) if req.stop else None
            if stopped is None and not done[i]:
                continue  # a stop string may still come
            if stopped is not None:
                tokens, text, reason = *stopped, "stop"
                stopped_rows.append(i)
            else:
                text = e.tokenizer.decode(tokens, skip_special_tokens=True) if e.tokenizer else ""
                reason = "eos" if eos[i] else "length"
            results.append(Result(
                id=req.id, prompt_tokens=len(req.token_ids), token_ids=tokens, text=text, finish_reason=reason,
                decode_steps=int(hist[i].sum()),
                accepted_per_step=np.array(hist[i], np.int64),  # a copy: refill zeroes the slot's row
                draft_tokens_proposed=int(drafted[i]), draft_tokens_accepted=int(accepted[i]),
                decode_seconds=time.perf_counter() - t0, bucket=e.max_prompt_len))
            self.rows[i] = None
        if stopped_rows:  # a host-side edit: an eager .at[] update would compile a kernel
            done = done.copy()
            done[stopped_rows] = True
            e.state = e.state.replace(done=jnp.asarray(done))
        return results


def _host_stats(state: Slots):
    """A state's proposal statistics as host arrays (None for modes without them)."""
    stats = getattr(state.extra, "stats", None)
    return None if stats is None else jax.device_get(stats)


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
