"""tau of a drafter, measured the only way that counts: the real ``Decoder`` in dflash mode.

Greedy decoding, so the accepted lengths are those a job would see. tau counts the
bonus token (tokens committed per verify step), as the DFlash paper does; the prefill's
first token is not a decode step and is excluded.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from dflash_batch.decoder._checkpoint import TargetModel
from dflash_batch.decoder._decoder import Decoder
from dflash_batch.decoder._drafter_checkpoint import Drafter
from dflash_batch.decoder._decode_config import DEFAULT_PROMPT_BUCKETS, DecodeConfig
from dflash_batch.decoder._requests import Request
from dflash_batch.schemas import tau_from_histogram


def decode_tau(target: TargetModel, prompts: Sequence[tuple[str, Sequence[int]]], *, mode: str = "dflash",
               drafter: Drafter | None = None, block_size: int | None = None,
               max_new_tokens: int = 64, batch_size: int = 8,
               prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS) -> dict:
    """Decodes ``prompts`` greedily in ``mode`` and returns acceptance statistics.

    Returns {tau: committed tokens / verify steps over all requests, tau_mean: the mean
    of per-request tau, steps, tokens, seconds, hist: steps that committed 1..L tokens}.
    """
    if block_size is None:
        block_size = drafter.config.block_size if drafter is not None else 16
    dec = Decoder(target, DecodeConfig(mode=mode, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                       prompt_buckets=tuple(prompt_buckets), block_size=block_size), drafter)
    reqs = [Request(id=i, token_ids=list(map(int, t)), max_new_tokens=max_new_tokens) for i, t in prompts]
    t0 = time.perf_counter()
    results = list(dec.generate(reqs))
    seconds = time.perf_counter() - t0
    hist = np.zeros(block_size, np.int64)
    for r in results:
        hist[: len(r.accepted_per_step)] += r.accepted_per_step[:block_size]
    steps = int(hist.sum())
    return {"tau": tau_from_histogram(hist, empty=1.0), "tau_mean": float(np.mean([r.tau for r in results])),
            "steps": steps, "tokens": sum(r.completion_tokens for r in results), "seconds": seconds,
            "hist": hist.tolist()}
