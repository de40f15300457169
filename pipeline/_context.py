"""The target's context: no position past it is ever decoded.

A model never saw positions past ``max_position_embeddings`` in training, so text decoded there
is meaningless, not an error: it must be refused rather than written. Two checks, from cheap to
late:
  1. before any work, the job: a prompt of the largest bucket plus ``decode.max_new_tokens`` must
     fit the context, else the job is refused naming ``decode.prompt_buckets``;
  2. per row, while tokenizing (``_tokenize.prepare_row``): prompt tokens plus the row's own
     max_new_tokens must fit, else the row is a ``prompt_too_long`` dead letter with the numbers.
"""

from __future__ import annotations

from typing import Any

from dflash_batch.pipeline._preflight import JobRefused


def model_context(model: str) -> int:
    """The target's ``max_position_embeddings``, from its config.json only."""
    from dflash_batch.pipeline._model import model_configs

    target, _ = model_configs(model, None, "ar")
    return target.max_position_embeddings


def check_context(spec: Any, context: int) -> None:
    """Refuses (JobRefused on decode.prompt_buckets) a job whose largest bucket cannot fit ``context``."""
    decode = spec.decode
    largest = decode.prompt_buckets[-1]
    if largest + decode.max_new_tokens > context:
        fitting = [b for b in decode.prompt_buckets if b + decode.max_new_tokens <= context]
        hint = (f"drop the buckets above {fitting[-1]}" if fitting
                else "use smaller buckets or a smaller decode.max_new_tokens")
        raise JobRefused("decode.prompt_buckets", (
            f"the largest bucket {largest} + decode.max_new_tokens {decode.max_new_tokens} = "
            f"{largest + decode.max_new_tokens} tokens, past the model's context of {context} "
            f"(max_position_embeddings of {spec.model.target}); {hint}"))
