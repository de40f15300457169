"""One ``Decoder`` interface over every decode mode."""

from __future__ import annotations

import time
from typing import Iterable, Iterator, Sequence

import numpy as np

from dflash_batch.decoder._ar import ar_decode, ar_prefill
from dflash_batch.decoder._checkpoint import TargetModel
from dflash_batch.decoder._engine import (CHUNK_STEPS, DEFAULT_PROMPT_BUCKETS, Phases, SlotEngine, bucket_for,
                                          falls_back_to_ar)
from dflash_batch.decoder._mesh import check_mesh, describe, is_sharded
from dflash_batch.decoder._requests import Request, Result
from dflash_batch.decoder._slots import Slots
from dflash_batch.decoder._speculative import PROPOSERS, init_spec_state, spec_decode, spec_prefill
from dflash_batch.decoder._spmd import bind_phases
from dflash_batch.schemas import MODES  # the completions contract's ``mode`` column names them

DRAFTER_MODES = ("dflash", "hybrid")  # the modes that need a drafter
AUTO_BLOCKS = (1, 2, 4, 8)  # candidates below the drafter's own block size


class Decoder:
    """Decodes streams of requests with a target model in one of ``MODES``.

    Requests are grouped by prompt-length bucket; each bucket runs on its own
    static batch of ``batch_size`` slots whose cache holds the bucket plus
    ``max_new_tokens``. Engines compile once, on first use or ``warmup``.
    """

    def __init__(self, target: TargetModel, *, mode: str = "ar", batch_size: int = 8, max_new_tokens: int = 256,
                 prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS, chunk_steps: int = CHUNK_STEPS,
                 prefill_chunk: int = 64, drafter=None, block_size: int | str = "auto", mesh=None):
        """``drafter`` is (DrafterConfig, params), required by ``dflash`` and ``hybrid``. ``block_size`` is the
        verified block length L (drafts per step + 1) of the speculative modes, or "auto":
        chosen per batch among AUTO_BLOCKS (1 = AR included) from measured step costs and
        observed acceptance. ``mesh``: a ``('data', 'model')`` mesh the target was loaded onto
        (``load_target(..., mesh=)``); None decodes on one device."""
        uses_drafter = mode in DRAFTER_MODES
        largest = drafter[0].block_size if (uses_drafter and drafter is not None) else 16
        if block_size == "auto":
            self.blocks = tuple(b for b in AUTO_BLOCKS if b < largest) + (largest,)
        elif isinstance(block_size, int) and not isinstance(block_size, bool):
            self.blocks = (block_size,)
        else:
            raise ValueError(f"{block_size=} must be an integer or 'auto'")
        block_size = max(self.blocks)
        if mode != "ar" and mode not in PROPOSERS:
            raise ValueError(f"unknown decode {mode=}; choose one of {MODES}")
        if uses_drafter:
            if drafter is None:
                raise ValueError(f"mode {mode!r} needs a drafter")
            drafter[0].check_target(target.config)
            if not 1 <= min(self.blocks) <= block_size <= drafter[0].block_size:
                raise ValueError(f"{block_size=} must be in [1, {drafter[0].block_size}] (the drafter's block size)")
        elif mode != "ar" and min(self.blocks) < 1:
            raise ValueError(f"{block_size=} must be >= 1 for mode {mode!r}")
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"{batch_size=} and {max_new_tokens=} must be >= 1")
        self.mesh = mesh if is_sharded(mesh) else None
        drafter = check_mesh(self.mesh, target, drafter if uses_drafter else None, batch_size)
        self.target = target
        self.mode = mode
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self.chunk_steps = chunk_steps
        self.prefill_chunk = prefill_chunk
        self.drafter = drafter if uses_drafter else None
        if mode == "ar":
            self.blocks = (1,)
        self.block_size = max(self.blocks)
        self._engines: dict[int, SlotEngine] = {}

    @property
    def mesh_description(self) -> str:
        """The chips this decoder spans, e.g. ``cpu x6, data 2 x model 3``."""
        return describe(self.mesh)

    @property
    def compile_seconds(self) -> float:
        return sum(e.compile_seconds for e in self._engines.values())

    def bucket(self, prompt_len: int) -> int:
        return bucket_for(prompt_len, self.prompt_buckets)

    def engine(self, bucket: int) -> SlotEngine:
        """The static batch for prompts of up to ``bucket`` tokens (built and compiled once)."""
        if bucket not in self._engines:
            cfg = self.target.config
            eos = self.target.eos_token_ids
            # Room for the prompt rounded up to whole prefill chunks, plus the completion; the same
            # in every mode, so each reads as much cache per step as AR. A verified block that runs
            # past the end is fine: its rows there are dropped, and only committed rows below a
            # slot's position are ever read.
            cache_len = -(-bucket // self.prefill_chunk) * self.prefill_chunk + self.max_new_tokens
            phases = self._phases(cache_len)
            self._engines[bucket] = SlotEngine(phases, self.target.tokenizer, bucket, self.max_new_tokens,
                                               self.prefill_chunk, self.chunk_steps)
        return self._engines[bucket]

    def _phases(self, cache_len: int) -> Phases:
        cfg, params, eos = self.target.config, self.target.params, self.target.eos_token_ids
        b, cap, blk = self.batch_size, self.max_new_tokens, self.block_size
        if self.mode == "ar":
            return bind_phases(
                prefill=lambda p, dp, s, *args: ar_prefill(p, cfg, eos, s, *args[:-1])[0],  # no drafter to feed
                decode=lambda p, dp, s, stop_first, n, gate, block: ar_decode(p, s, stop_first, n, cfg=cfg,
                                                                              eos_ids=eos),
                init_state=lambda: Slots.init(cfg, b, cache_len, cap, 1),
                params=params, dparams=None, mesh=self.mesh,
            )
        dcfg, dparams = self.drafter if self.drafter is not None else (None, None)
        static = dict(cfg=cfg, eos_ids=eos, dcfg=dcfg, mode=self.mode)
        gated = falls_back_to_ar(self.blocks)
        return bind_phases(
            prefill=lambda p, dp, s, *args: spec_prefill(p, dp, s, *args[:-1], feed=args[-1], **static),
            decode=lambda p, dp, s, stop_first, n, gate, block: spec_decode(
                p, dp, s, stop_first, n, gate, block=block, gated=gated, **static),
            init_state=lambda: Slots.init(cfg, b, cache_len, cap, blk,
                                          extra=init_spec_state(b, cache_len, dcfg, blk)),
            params=params, dparams=dparams, mesh=self.mesh,
            blocks=self.blocks,
            drafter_context=dcfg is not None,
        )

    def reset(self, bucket: int | None = None) -> None:
        """Drops the slot state of one bucket's batch (or all): the next request starts clean.

        Compiled programs are kept; used after a failure left a batch half decoded.
        """
        for b, e in self._engines.items():
            if bucket is None or b == bucket:
                e.state = None

    def block_report(self) -> dict:
        """Per bucket: the block lengths measured and chosen, and why (for job stats)."""
        report = {}
        for b, e in sorted(self._engines.items()):
            report[str(b)] = e.policy.report()
            stats = getattr(e.state.extra, "stats", None) if e.state is not None else None
            if stats is not None and self.mode == "hybrid":
                report[str(b)]["hybrid"] = hybrid_report(stats)
        return report

    def warmup(self, bucket: int) -> float:
        """Compiles the engine of one bucket; returns the seconds it took."""
        return self.engine(bucket).warmup()

    def generate(self, requests: Iterable[Request], bucket: int | None = None,
                 ticks: bool = False) -> Iterator[Result | None]:
        """Decodes requests, yielding results as rows finish (not in input order).

        With ``bucket`` given, every request must fit it; otherwise the requests are
        read first and all share the static batch of the largest bucket they need,
        so a small job keeps its batch full. (The pipeline buckets large jobs by
        length, which keeps each batch's cache short.) With ``ticks``, None is yielded
        too, after every prompt prefilled and every decode call (``SlotEngine.run``).
        """
        if bucket is None:
            requests = list(requests)
            if not requests:
                return
            bucket = max(self.bucket(len(r.token_ids)) for r in requests)
        yield from self.engine(bucket).run(requests, ticks)


def hybrid_report(st) -> dict:
    """The hybrid chooser's view: steps per source, the expected accepted n-gram drafts of a
    full block by match length, and how well the drafter's confidence predicted its
    acceptance (1.0 = calibrated). Estimates include one optimistic prior observation."""
    rates = np.asarray(st.ngram_hits) / np.asarray(st.ngram_tries)  # [match length, position]
    expect = np.cumprod(rates, axis=1).sum(axis=1)
    return {"steps_ngram": int(st.chose_ngram), "steps_dflash": int(st.chose_dflash),
            "ngram_accepted_by_match_length": {str(k): round(float(expect[k]), 3) for k in range(1, len(expect))},
            "dflash_calibration": round(float(st.dflash_acc / st.dflash_pred), 3)}


def timed_generate(decoder: Decoder, requests: Sequence[Request]) -> tuple[list[Result], float]:
    """Runs all requests after warming up their buckets; returns results and decode seconds."""
    decoder.warmup(max(decoder.bucket(len(r.token_ids)) for r in requests))
    t0 = time.perf_counter()
    results = list(decoder.generate(requests))
    return results, time.perf_counter() - t0
