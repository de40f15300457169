"""One ``Decoder`` interface over every decode mode."""

from __future__ import annotations

import time
from typing import Iterable, Iterator, Sequence

import jax.numpy as jnp

from dflash_batch.decoder._ar import ar_decode, ar_prefill
from dflash_batch.decoder._checkpoint import TargetModel
from dflash_batch.decoder._engine import DEFAULT_PROMPT_BUCKETS, Phases, SlotEngine, bucket_for
from dflash_batch.decoder._requests import Request, Result
from dflash_batch.decoder._slots import Slots

MODES = ("ar",)


class Decoder:
    """Decodes streams of requests with a target model in one of ``MODES``.

    Requests are grouped by prompt-length bucket; each bucket runs on its own
    static batch of ``batch_size`` slots whose cache holds the bucket plus
    ``max_new_tokens``. Engines compile once, on first use or ``warmup``.
    """

    def __init__(self, target: TargetModel, *, mode: str = "ar", batch_size: int = 8, max_new_tokens: int = 256,
                 prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS, chunk_steps: int = 64,
                 prefill_chunk: int = 64):
        if mode not in MODES:
            raise ValueError(f"unknown decode {mode=}; choose one of {MODES}")
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"{batch_size=} and {max_new_tokens=} must be >= 1")
        self.target = target
        self.mode = mode
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self.chunk_steps = chunk_steps
        self.prefill_chunk = prefill_chunk
        self._engines: dict[int, SlotEngine] = {}

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
            # Room for the prompt rounded up to whole prefill chunks, plus the completion.
            cache_len = -(-bucket // self.prefill_chunk) * self.prefill_chunk + self.max_new_tokens + 1
            params = self.target.params
            phases = Phases(
                prefill=lambda s, *args: ar_prefill(params, cfg, eos, s, *args)[0],
                decode=lambda s, stop_first: ar_decode(params, s, stop_first, cfg=cfg, eos_ids=eos,
                                                       n_steps=self.chunk_steps),
                init_state=lambda: Slots.init(cfg, self.batch_size, cache_len, self.max_new_tokens, 1),
            )
            self._engines[bucket] = SlotEngine(phases, self.target.tokenizer, bucket, self.max_new_tokens,
                                               self.prefill_chunk)
        return self._engines[bucket]

    def warmup(self, bucket: int) -> float:
        """Compiles the engine of one bucket; returns the seconds it took."""
        return self.engine(bucket).warmup()

    def generate(self, requests: Iterable[Request], bucket: int | None = None) -> Iterator[Result]:
        """Decodes requests, yielding results as rows finish (not in input order).

        With ``bucket`` given, every request must fit it; otherwise the requests are
        read first and all share the static batch of the largest bucket they need,
        so a small job keeps its batch full. (The pipeline buckets large jobs by
        length, which keeps each batch's cache short.)
        """
        if bucket is None:
            requests = list(requests)
            if not requests:
                return
            bucket = max(self.bucket(len(r.token_ids)) for r in requests)
        yield from self.engine(bucket).run(requests)


def timed_generate(decoder: Decoder, requests: Sequence[Request]) -> tuple[list[Result], float]:
    """Runs all requests after warming up their buckets; returns results and decode seconds."""
    decoder.warmup(max(decoder.bucket(len(r.token_ids)) for r in requests))
    t0 = time.perf_counter()
    results = list(decoder.generate(requests))
    return results, time.perf_counter() - t0
