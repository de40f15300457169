"""The completions contract: one output row per decoded input row."""

from __future__ import annotations

import pyarrow as pa

from ._meta import NAME_KEY, SchemaError, contract_metadata
from ._prompts import PROMPT_COLUMNS

FINISH_REASONS = ("stop", "length", "eos")
MODES = ("ar", "dflash", "ngram", "hybrid")

COMPLETIONS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("completion", pa.string(), nullable=False),
        ("completion_token_ids", pa.list_(pa.int32())),
        pa.field("finish_reason", pa.string(), nullable=False),  # one of FINISH_REASONS
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("decode_steps", pa.int32()),  # target forward passes
        # Tokens committed per step, bonus token included: the paper's tau.
        ("acceptance_length_mean", pa.float32()),
        # Histogram: index i = number of steps that committed i + 1 tokens (length block_size).
        ("accepted_per_step", pa.list_(pa.int16())),
        ("draft_tokens_proposed", pa.int32()),
        ("draft_tokens_accepted", pa.int32()),
        ("bucket", pa.int32()),  # padded prompt length of the batch
        ("batch_index", pa.int64()),
        ("worker", pa.string()),
        ("decode_seconds", pa.float64()),
        ("model", pa.string()),
        ("drafter", pa.string()),  # null in mode "ar"
        ("mode", pa.string()),  # one of MODES
        ("dtype", pa.string()),  # the model's dtype (bfloat16 / float32): it changes completions
        # Prompt tokens cut from the start (job setting prompt.truncate = "left"); 0 when none were.
        ("prompt_truncated_tokens", pa.int32()),
    ],
    metadata=contract_metadata("completions", version=2),
)


def with_extra_columns(base_schema: pa.Schema, input_schema: pa.Schema) -> pa.Schema:
    """`base_schema` plus the input's own columns (those not in PROMPTS_SCHEMA), types kept.

    Raises SchemaError when a carried column would shadow an output column: silently
    renaming or dropping it would break the user's joins.
    """
    extra = [f for f in input_schema if f.name not in PROMPT_COLUMNS]
    names = [f.name for f in extra]
    clash = sorted({n for n in names if n in base_schema.names or names.count(n) > 1})
    if clash:
        target = (base_schema.metadata or {}).get(NAME_KEY, b"output").decode()
        raise SchemaError(
            f"input column(s) {', '.join(map(repr, clash))} clash with {target} columns "
            "or repeat; rename them in the input"
        )
    return pa.schema([*base_schema, *extra], metadata=base_schema.metadata)
