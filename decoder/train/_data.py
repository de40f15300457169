"""Training text: the target's own greedy responses to the training prompts, cached on disk.

The DFlash paper regenerates every response with the target: the drafter must predict
what verification will accept, and under greedy decoding that is exactly the target's
greedy continuation. Our own ``Decoder`` generates them (batched, static shapes), and
each finished response is appended to a JSON-lines file at once, so an interrupted
generation resumes where it stopped and a grown prompt set only decodes the new ids.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dflash_batch.decoder._checkpoint import TargetModel
from dflash_batch.decoder._decoder import Decoder
from dflash_batch.decoder._decode_config import DEFAULT_PROMPT_BUCKETS, DecodeConfig
from dflash_batch.decoder._engine import bucket_for
from dflash_batch.decoder._requests import Request


@dataclasses.dataclass(frozen=True)
class Sample:
    """One training sequence: a prompt and the target's greedy response to it.

    ``response_ids`` ends with the EOS token when the target stopped by itself, so the
    drafter also learns to draft the end of a response.
    """

    id: str
    prompt_ids: np.ndarray  # [P] int32
    response_ids: np.ndarray  # [R] int32
    finish_reason: str

    @property
    def token_ids(self) -> np.ndarray:  # [P + R]
        return np.concatenate([self.prompt_ids, self.response_ids]).astype(np.int32)


def read_samples(path: Path) -> dict[str, Sample]:
    """Every response cached in ``path`` (a missing file holds none)."""
    out: dict[str, Sample] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by an interruption: decode it again
            continue
        out[d["id"]] = Sample(d["id"], np.asarray(d["prompt"], np.int32), np.asarray(d["response"], np.int32),
                              d["finish_reason"])
    return out


class PackedSequences:
    """Sequences stored one after another: sequence i spans rows ``offsets[i]:offsets[i+1]``, of
    which the first ``prompt_lens[i]`` are its prompt (subclasses hold ids, offsets, prompt_lens)."""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def seq_lens(self) -> np.ndarray:  # [n]
        return np.diff(self.offsets).astype(np.int32)

    @property
    def response_tokens(self) -> int:
        return int((self.seq_lens - self.prompt_lens).sum())

    def rows(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))


def generate_responses(target: TargetModel, prompts: Sequence[tuple[str, Sequence[int]]], path: Path, *,
                       max_new_tokens: int, batch_size: int = 8, mode: str = "ar", drafter=None,
                       block_size: int = 16, prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
                       progress: Callable[[int, int, float], None] | None = None,
                       deadline: float | None = None) -> list[Sample]:
    """The target's greedy response to every ``(id, prompt token ids)``, in prompt order.

    Responses already in ``path`` are reused; the rest are decoded with ``Decoder`` in
    ``mode`` (``ar``, or a lossless speculative mode: the tokens are the same) and
    appended as they finish. Prompts are grouped by length bucket so a short prompt
    never pays for a long one's cache. ``progress(done, total, tokens_per_s)`` is called
    after every response. Past ``deadline`` (a ``time.time()``) no more responses are
    decoded, and only the prompts answered so far are returned (still in prompt order).
    """
    ids = [p[0] for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError("prompt ids must be unique")
    path.parent.mkdir(parents=True, exist_ok=True)
    cached = read_samples(path)
    # A cached response counts only for the same prompt tokens and budget (a changed
    # template or tokenizer decodes again; the newer line wins when the file is read).
    wanted = {i: list(map(int, t)) for i, t in prompts}
    done = {i: s for i, s in cached.items() if s.prompt_ids.tolist() == wanted.get(i) and (
        len(s.response_ids) == max_new_tokens
        or (s.finish_reason != "length" and len(s.response_ids) < max_new_tokens))}
    todo = [Request(id=i, token_ids=t, max_new_tokens=max_new_tokens) for i, t in wanted.items() if i not in done]
    if todo:
        dec = Decoder(target, DecodeConfig(mode=mode, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                           prompt_buckets=tuple(prompt_buckets), block_size=block_size), drafter)
        groups: dict[int, list[Request]] = {}
        for r in todo:
            groups.setdefault(bucket_for(len(r.token_ids), dec.config.prompt_buckets), []).append(r)
        by_id = {r.id: r for r in todo}
        n_tokens, t0 = 0, time.perf_counter()
        with path.open("a") as f:
            for bucket in sorted(groups):
                if deadline is not None and time.time() >= deadline:
                    break
                for res in dec.generate(groups[bucket], bucket=bucket):
                    prompt = by_id[res.id].token_ids
                    f.write(json.dumps({"id": res.id, "prompt": list(prompt), "response": res.token_ids,
                                        "finish_reason": res.finish_reason}) + "\n")
                    f.flush()
                    done[res.id] = Sample(res.id, np.asarray(prompt, np.int32), np.asarray(res.token_ids, np.int32),
                                          res.finish_reason)
                    n_tokens += len(res.token_ids)
                    if progress is not None:
                        progress(len(done), len(ids), n_tokens / (time.perf_counter() - t0))
                    if deadline is not None and time.time() >= deadline:
                        break
    return [done[i] for i in ids if i in done]
