"""The dead-letters contract: rows that could not be decoded, with the reason.

Version 2 adds ``kind``: a stable name for the reason (``DEAD_LETTER_KINDS``), so summaries and
the audit group dead letters by kind while ``error`` keeps the details (the id, the numbers).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import decimal
import json
import math
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from ._meta import contract_metadata

# Each reason a row can fail for, by a name that never changes (what summaries group by).
DEAD_LETTER_KINDS = (
    "unreadable",  # a column of the input file could not be read
    "invalid_utf8",  # text that is not valid UTF-8
    "missing_id",  # no usable id
    "duplicate_id",  # another row has the same id; one of them is decoded
    "invalid_row",  # the row breaks the prompts contract (a missing prompt, a bad option)
    "render_failed",  # the prompt template could not render the row
    "empty_prompt",  # the prompt renders to zero tokens
    "max_new_tokens_too_large",  # the row asks for more new tokens than the job's decoder holds
    "prompt_too_long",  # prompt tokens (+ new tokens) exceed the largest bucket or the model's context
    "decode_failed",  # the decoder failed on the row's batch
)

DEAD_LETTERS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # null when the row had no usable id
        pa.field("kind", pa.string(), nullable=False),  # one of DEAD_LETTER_KINDS
        pa.field("error", pa.string(), nullable=False),  # human-readable reason, with its details
        pa.field("row_json", pa.string(), nullable=False),  # the original row, so it can be fixed and resent
        ("source", pa.string()),  # the input file the row came from
    ],
    metadata=contract_metadata("dead_letters", version=2),
)


def _jsonable(value: Any) -> Any:
    """`value` as plain JSON data; anything odd becomes a string rather than an error."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        # Strict JSON has no NaN/Infinity; keep them readable instead.
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return "base64:" + base64.b64encode(value).decode("ascii")
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    return repr(value)


def row_to_json(row: Mapping[str, Any]) -> str:
    """The row as JSON; never raises (lone surrogates come out escaped, since output is ASCII)."""
    return json.dumps(_jsonable(row), ensure_ascii=True)


def dead_letter_row(row: Mapping[str, Any], kind: str, error: str, source: str | None) -> dict[str, Any]:
    """A DEAD_LETTERS_SCHEMA row for `row`, which failed for `kind` (one of DEAD_LETTER_KINDS) with details `error`."""
    if kind not in DEAD_LETTER_KINDS:
        raise ValueError(f"unknown dead-letter {kind=}; expected one of {', '.join(DEAD_LETTER_KINDS)}")
    rid = row.get("id") if isinstance(row, Mapping) else None
    # A non-string id, or one with a lone surrogate, could not be written as an Arrow string.
    writable = isinstance(rid, str) and rid.encode("utf-8", "replace").decode("utf-8") == rid
    return {"id": rid if writable else None, "kind": kind, "error": error, "row_json": row_to_json(row), "source": source}


def dead_letter_key(row: Mapping[str, Any]) -> str:
    """What identifies a dead letter across files and runs: its id, so a retry or rerun that writes
    it again counts once, and a later completion of the id supersedes it. A duplicate-id row, or
    one without an id, is keyed by its kind, source and content instead (the id is not its own)."""
    if row.get("id") is not None and row.get("kind") != "duplicate_id":
        return row["id"]
    text = f"{row.get('kind')}\x00{row.get('source')}\x00{row.get('row_json')}"
    return "#" + hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()
