"""The dead-letters contract: rows that could not be decoded, with the reason."""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import math
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from ._meta import contract_metadata

DEAD_LETTERS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # null when the row had no usable id
        pa.field("error", pa.string(), nullable=False),  # human-readable reason
        pa.field("row_json", pa.string(), nullable=False),  # the original row, so it can be fixed and resent
        ("source", pa.string()),  # the input file the row came from
    ],
    metadata=contract_metadata("dead_letters"),
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


def dead_letter_row(row: Mapping[str, Any], error: str, source: str | None) -> dict[str, Any]:
    """A DEAD_LETTERS_SCHEMA row for `row`, which failed with reason `error`."""
    rid = row.get("id") if isinstance(row, Mapping) else None
    # A non-string id, or one with a lone surrogate, could not be written as an Arrow string.
    writable = isinstance(rid, str) and rid.encode("utf-8", "replace").decode("utf-8") == rid
    return {"id": rid if writable else None, "error": error, "row_json": row_to_json(row), "source": source}
