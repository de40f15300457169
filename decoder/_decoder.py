"""One ``Decoder`` interface over every decode mode."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from dflash_batch.decoder._ar import ar_decode, ar_prefill
from dflash_batch.decoder._checkpoint import TargetModel
from dflash_batch.decoder._cost_table import cost_key
from dflash_batch.decoder._decode_config import DecodeConfig
from dflash_batch.decoder._drafter_checkpoint import Drafter
from dflash_batch.decoder._engine import (BatchRun, Phases, SlotEngine, StateHolder, bind_phases, bucket_for,
                                          falls_back_to_ar)
from dflash_batch.decoder._mesh import check_mesh, describe, is_sharded
from dflash_batch.decoder._proposers import proposer_for
from dflash_batch.decoder._requests import Request, Result
from dflash_batch.decoder._speculative import spec_decode, spec_prefill
from dflash_batch.decoder._state import DRAFTER_MODES, cache_length, decode_blocks, new_state


class Decoder:
    """Decodes streams of requests with a target model, as ``config`` says.

    Requests are grouped by prompt-length bucket; each bucket runs on its own static batch of
    ``config.batch_size`` slots whose cache holds the bucket plus ``config.max_new_tokens``.
    Engines compile once, on first use or ``warmup``, and keep their programs; the slot state
    is one per decoder, held by the bucket that ran last (``StateHolder``), so memory is one
    bucket's state whatever the number of buckets seen. ``drafter`` is required by the modes
    in ``DRAFTER_MODES`` and unused by the others. The mesh is the target's: a target loaded
    onto a ``('data', 'model')`` mesh (``load_target(..., mesh=)``) decodes on it, the drafter
    laid out beside it; any other decodes on one device.
    ``proposer``: what drafts in a speculative mode (``decoder/_proposers.py``); None: the one
    the mode names.
    """

    def __init__(self, target: TargetModel, config: DecodeConfig = DecodeConfig(), drafter: Drafter | None = None,
                 *, proposer=None):
        mode = config.mode
        if proposer is not None and mode == "ar":
            raise ValueError("a proposer needs a speculative mode (mode='ar' drafts nothing)")
        self.proposer = proposer if proposer is not None else proposer_for(mode)
        if mode in DRAFTER_MODES:
            if drafter is None:
                raise ValueError(f"mode {mode!r} needs a drafter")
            drafter.config.check_target(target.config)
            largest = drafter.config.block_size
            if config.block_size != "auto" and config.block_size > largest:
                raise ValueError(f"block_size={config.block_size} must be in [1, {largest}] (the drafter's block size)")
        else:
            drafter = None
        self.blocks: tuple[int, ...] = decode_blocks(config, drafter.config.block_size if drafter else None)
        self.mesh = target.mesh if is_sharded(target.mesh) else None
        self.target = target
        self.config = config
        self.drafter = check_mesh(self.mesh, target, drafter, config.batch_size)
        self._engines: dict[int, SlotEngine] = {}
        self._holder = StateHolder()  # the one slot state, shared by every bucket's engine

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @property
    def max_new_tokens(self) -> int:
        return self.config.max_new_tokens

    @property
    def compile_seconds(self) -> float:
        return sum(e.compile_seconds for e in self._engines.values())

    def bucket(self, prompt_len: int) -> int:
        return bucket_for(prompt_len, self.config.prompt_buckets)

    def engine(self, bucket: int) -> SlotEngine:
        """The static batch for prompts of up to ``bucket`` tokens (built and compiled once)."""
        if bucket not in self._engines:
            c = self.config
            # Room for the prompt rounded up to whole prefill chunks, plus the completion; the same
            # in every mode, so each reads as much cache per step as AR. A verified block that runs
            # past the end is fine: its rows there are dropped, and only committed rows below a
            # slot's position are ever read.
            cache_len = cache_length(bucket, c)
            self._engines[bucket] = SlotEngine(self._phases(cache_len), self.target.tokenizer, bucket,
                                               c.max_new_tokens, c.prefill_chunk, c.chunk_steps, self._holder,
                                               cost_key=self._cost_key(cache_len))
        return self._engines[bucket]

    def _cost_key(self, cache_len: int) -> str:
        """Names what a decode step's cost depends on, for measurements kept across jobs."""
        import jax

        dtypes = sorted({str(a.dtype) for a in jax.tree.leaves(self.target.params)})
        dcfg = self.drafter.config if self.drafter is not None else None
        # The proposer is named too: a caller's own (a test's oracle) costs what its programs cost.
        return cost_key(jax.devices()[0].device_kind, describe(self.mesh), self.mode, repr(self.proposer),
                        self.target.config, dcfg, dtypes, self.config.batch_size, cache_len,
                        self.config.prefill_chunk, self.blocks)

    def _phases(self, cache_len: int) -> Phases:
        cfg, params, eos = self.target.config, self.target.params, self.target.eos_token_ids
        dcfg = self.drafter.config if self.drafter is not None else None
        init_state = lambda: new_state(cfg, dcfg, self.config, cache_len, self.blocks)  # noqa: E731
        if self.mode == "ar":
            return bind_phases(
                prefill=lambda p, d, s, *args: ar_prefill(p, cfg, eos, s, *args)[0],
                decode=lambda p, d, s, stop_on_first_done, max_steps, gate, block: ar_decode(
                    p, s, stop_on_first_done, max_steps, cfg=cfg, eos_ids=eos),
                init_state=init_state, params=params, drafter=None, mesh=self.mesh,
            )
        static = dict(cfg=cfg, eos_ids=eos, proposer=self.proposer)
        gated = falls_back_to_ar(self.blocks)
        return bind_phases(
            prefill=lambda p, d, s, *args: spec_prefill(p, d, s, *args, **static),
            decode=lambda p, d, s, stop_on_first_done, max_steps, gate, block: spec_decode(
                p, d, s, stop_on_first_done, max_steps, gate, block=block, gated=gated, **static),
            init_state=init_state, params=params, drafter=self.drafter, mesh=self.mesh, blocks=self.blocks,
        )

    def reset(self, bucket: int | None = None) -> None:
        """Drops the slot state if one bucket's batch (or any) holds it: the next request starts clean.

        Compiled programs and measured costs are kept; used after a failure left a batch half decoded.
        """
        owner = self._holder.owner
        if owner is not None and (bucket is None or owner.max_prompt_len == bucket):
            self._holder.claim(None)

    def block_report(self) -> dict:
        """Per bucket: the block lengths measured and chosen, and why (for job stats)."""
        report = {}
        for b, e in sorted(self._engines.items()):
            report[str(b)] = e.policy.report()
            report[str(b)]["warmup_seconds"] = {k: round(v, 3) for k, v in e.warmup_seconds.items()}
            report[str(b)]["costs"] = e.costs_source or "fixed block length"
            stats = getattr(e.state.extra, "stats", None) if e.state is not None else e.kept_stats
            if stats is not None and self.mode == "hybrid":
                report[str(b)]["hybrid"] = hybrid_report(stats)
        return report

    def warmup(self, bucket: int, lazy: bool = False) -> float:
        """Compiles the engine of one bucket; returns the seconds it took. ``lazy``: of an
        automatic block length, only AR and the smallest speculative length now, each larger
        one when the policy could first want it (``SlotEngine.warmup``)."""
        return self.engine(bucket).warmup(lazy)

    def start(self, requests: Iterable[Request], bucket: int | None = None, rows_after: int | None = None
              ) -> BatchRun:
        """A run of ``requests`` through one static batch, driven step by step (``BatchRun``).

        With ``bucket`` given, every request must fit it; otherwise the requests are read
        first and all share the static batch of the largest bucket they need, so a small job
        keeps its batch full. (The pipeline buckets large jobs by length, which keeps each
        batch's cache short.) ``rows_after``: how many more rows this decoder may get after
        these (0: none; None: unknown). With it and a list, a lazily warmed batch compiles a
        larger block length only where the work left could pay for it (``_lazy_blocks``).
        """
        if bucket is None:
            requests = list(requests)
            bucket = max((self.bucket(len(r.token_ids)) for r in requests), default=self.config.prompt_buckets[0])
        return self.engine(bucket).start(requests, rows_after)

    def generate(self, requests: Iterable[Request], bucket: int | None = None, rows_after: int | None = None
                 ) -> Iterator[Result]:
        """Decodes requests, yielding results as rows finish (not in input order); ``bucket``
        and ``rows_after`` as for ``start``."""
        requests = requests if bucket is not None else list(requests)
        if bucket is not None or requests:
            yield from self.start(requests, bucket, rows_after).results()


def hybrid_report(st) -> dict:
    """The hybrid chooser's view: steps per source, the expected accepted n-gram drafts of a
    full block by match length, and how well the drafter's confidence predicted its
    acceptance (1.0 = calibrated). Estimates include one optimistic prior observation."""
    rates = np.asarray(st.ngram_hits) / np.asarray(st.ngram_tries)  # [match length, position]
    expect = np.cumprod(rates, axis=1).sum(axis=1)
    return {"steps_ngram": int(st.chose_ngram), "steps_dflash": int(st.chose_dflash),
            "ngram_accepted_by_match_length": {str(k): round(float(expect[k]), 3) for k in range(1, len(expect))},
            "dflash_calibration": round(float(st.dflash_acc / st.dflash_pred), 3)}

