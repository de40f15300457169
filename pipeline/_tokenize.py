"""Rendering a validated row into token ids, and the request it becomes.

The job's sampling settings fill in what a row leaves null. A row without a seed gets one
derived from the job seed and its id, so sampled outputs do not depend on row order, batch
neighbours or worker, and a rerun samples the same text for the same id.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import apache_beam as beam

from dflash_batch.decoder import Request, bucket_for
from dflash_batch.pipeline._config import JobConfig
from dflash_batch.pipeline._rows import DEAD
from dflash_batch.decoder import render_row
from dflash_batch.schemas import dead_letter_row

_SEED_MASK = 2**63 - 1  # the decoder takes a non-negative int64 seed


def derive_seed(job_seed: int, rid: str) -> int:
    """A row's seed when it has none: stable across runs, processes and Python versions."""
    digest = hashlib.blake2b(f"{job_seed}\x00{rid}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A tokenized row on its way to the decoder, with what its output row needs."""

    id: str
    token_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    bucket: int
    source: str
    row: dict[str, Any]  # the input row: carried columns for the completion, or the dead letter
    truncated: int = 0  # prompt tokens cut from the start (prompt.truncate = "left")

    def request(self) -> Request:
        return Request(id=self.id, token_ids=list(self.token_ids), max_new_tokens=self.max_new_tokens,
                       temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=self.stop)


def _default(value: Any, job_value: Any) -> Any:
    return job_value if value is None else value


def prepare_row(tokenizer, row: dict[str, Any], source: str, config: JobConfig) -> Prepared | tuple[str, str]:
    """The row as a ``Prepared`` request, or (dead-letter kind, reason) when this job cannot decode it.

    ``row`` has passed ``validate_prompt_row``; the checks here need the tokenizer or the job:
      1. the row's max_new_tokens fits the decoder's static completion capacity;
      2. the prompt renders to at least one token;
      3. prompt tokens + max_new_tokens fit the target's context (``config.context_tokens``):
         positions past it were never trained, so the text there would be meaningless;
      4. the prompt fits the largest bucket.
    A prompt failing 3 or 4 is a ``prompt_too_long`` dead letter, or with ``prompt.truncate = "left"``
    loses its first tokens until it fits (its completion row records how many).
    """
    decode, prompt = config.spec.decode, config.spec.prompt
    max_new = _default(row.get("max_new_tokens"), decode.max_new_tokens)
    if max_new > decode.max_new_tokens:
        return "max_new_tokens_too_large", (
            f"max_new_tokens {max_new} exceeds the job's decode.max_new_tokens {decode.max_new_tokens} "
            "(the decoder's static completion capacity)")
    token_ids = render_row(tokenizer, row, prompt.template, prompt.instruction)
    if not token_ids:
        return "empty_prompt", "prompt renders to zero tokens"
    context = config.context_tokens
    room = min(decode.prompt_buckets[-1], context - max_new if context is not None else len(token_ids))
    truncated = 0
    if prompt.truncate == "left" and 0 < room < len(token_ids):
        truncated = len(token_ids) - room
        token_ids = token_ids[truncated:]
    if context is not None and len(token_ids) + max_new > context:
        return "prompt_too_long", (
            f"prompt is {len(token_ids)} tokens + max_new_tokens {max_new} = {len(token_ids) + max_new}, "
            f"more than the model's context of {context} tokens (max_position_embeddings)")
    largest = decode.prompt_buckets[-1]
    if len(token_ids) > largest:
        return "prompt_too_long", (
            f"prompt is {len(token_ids)} tokens, longer than the largest bucket ({largest}); "
            "shorten it or add a larger bucket to decode.prompt_buckets")
    seed = row.get("seed")
    return Prepared(
        id=row["id"], token_ids=tuple(int(t) for t in token_ids), max_new_tokens=int(max_new),
        temperature=float(_default(row.get("temperature"), decode.temperature)),
        top_p=float(_default(row.get("top_p"), decode.top_p)),
        seed=derive_seed(decode.seed, row["id"]) if seed is None else int(seed) & _SEED_MASK,
        stop=tuple(row.get("stop") or ()), bucket=bucket_for(len(token_ids), decode.prompt_buckets),
        source=source, row=row, truncated=truncated,
    )


class Tokenize(beam.DoFn):
    """(file, row) -> Prepared, or a dead letter with the reason; the tokenizer loads once per process."""

    def __init__(self, config: JobConfig):
        self.config = config

    def setup(self):
        from dflash_batch.pipeline._io import use_anonymous_gcs_for_emulator
        from dflash_batch.pipeline._model import shared_tokenizer

        use_anonymous_gcs_for_emulator()
        self.tokenizer, self.lock = shared_tokenizer(self.config.spec.model.target)

    def process(self, element: tuple[str, dict]):
        source, row = element
        try:
            with self.lock:
                out = prepare_row(self.tokenizer, row, source, self.config)
        except Exception as e:  # noqa: BLE001 - e.g. a chat template that rejects the messages
            out = "render_failed", f"could not render the prompt: {type(e).__name__}: {e}"
        if isinstance(out, tuple):
            yield beam.pvalue.TaggedOutput(DEAD, dead_letter_row(row, *out, source))
        else:
            yield out
