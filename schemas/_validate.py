"""Validation of input schemas (may raise, before a job starts) and rows (never raises)."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa

from ._completions import COMPLETIONS_SCHEMA, FINISH_REASONS, MODES, with_extra_columns
from ._meta import SchemaError
from ._prompts import MESSAGE_ROLES, TEMPLATE_COLUMNS, TEMPLATES

_INT32_MAX = 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# C0 and C1 controls (and DEL) other than \t \n \r: they break tokenizers and terminals.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# A lone surrogate cannot be encoded as UTF-8, so it would fail the Parquet write later.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _show(value: Any) -> str:
    """A short, printable rendering of a bad value for a reason string."""
    text = str(value) if isinstance(value, numbers.Number) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _text_problem(name: str, value: Any, *, allow_empty: bool = False) -> str | None:
    """Why `value` is not acceptable text for field `name`, or None."""
    if value is None:
        return f"missing {name}"
    if not isinstance(value, str):
        return f"{name} must be a string, got {type(value).__name__}"
    if not allow_empty and not value.strip():
        return f"{name} is empty"
    if m := _SURROGATE.search(value):
        return f"{name} is not valid UTF-8 (lone surrogate U+{ord(m.group()):04X} at offset {m.start()})"
    if m := _CONTROL.search(value):
        return f"{name} contains control characters (U+{ord(m.group()):04X} at offset {m.start()})"
    return None


def _length_problem(name: str, chars: int, max_chars: int | None) -> str | None:
    if max_chars is not None and chars > max_chars:
        return f"{name} is too long ({chars} chars > max_prompt_chars={max_chars})"
    return None


def _messages_problem(messages: Any, max_chars: int | None) -> str | None:
    if not isinstance(messages, (list, tuple)):
        return f"messages must be a list of {{role, content}}, got {type(messages).__name__}"
    if not messages:
        return "messages is empty"
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            return f"messages[{i}] must be a {{role, content}} struct, got {type(msg).__name__}"
        if msg.get("role") not in MESSAGE_ROLES:
            return f"messages[{i}].role must be one of {'/'.join(MESSAGE_ROLES)}, got {_show(msg.get('role'))}"
        # Empty content is legitimate (e.g. an assistant turn that only called a tool).
        if reason := _text_problem(f"messages[{i}].content", msg.get("content"), allow_empty=True):
            return reason
    return _length_problem("messages", sum(len(m["content"]) for m in messages), max_chars)


def _text_input_problem(row: Mapping[str, Any], template: str, max_chars: int | None) -> str | None:
    """Why the row lacks the text its template reads, or None."""
    if template == "summarize":
        doc = row.get("document")
        return _text_problem("document", doc) or _length_problem("document", len(doc), max_chars)
    prompt, messages = row.get("prompt"), row.get("messages")
    has_prompt = isinstance(prompt, str) and bool(prompt.strip())
    has_messages = isinstance(messages, (list, tuple)) and bool(messages)
    if has_prompt and has_messages:
        return "both prompt and messages given; use one"
    if has_messages or (messages is not None and prompt is None):
        return _messages_problem(messages, max_chars)
    if prompt is None:
        return "missing prompt or messages (template 'none' needs one)"
    return _text_problem("prompt", prompt) or _length_problem("prompt", len(prompt), max_chars)


def _options_problem(row: Mapping[str, Any]) -> str | None:
    """Why the per-request sampling options are unusable, or None. Null means "job default"."""
    if (v := row.get("max_new_tokens")) is not None:
        if not _is_int(v) or v <= 0:
            return f"max_new_tokens must be a positive integer, got {_show(v)}"
        if v > _INT32_MAX:
            return f"max_new_tokens must fit in int32, got {v}"
    if (v := row.get("temperature")) is not None:
        if not _is_real(v) or not math.isfinite(v):
            return f"temperature must be a finite number, got {_show(v)}"
        if v < 0:
            return f"temperature must be >= 0, got {_show(v)}"
    if (v := row.get("top_p")) is not None:
        if not _is_real(v) or not 0 < v <= 1:  # NaN fails the comparison too
            return f"top_p must be in (0, 1], got {_show(v)}"
    if (v := row.get("seed")) is not None:
        if not _is_int(v):
            return f"seed must be an integer, got {_show(v)}"
        if not _INT64_MIN <= v <= _INT64_MAX:
            return f"seed must fit in int64, got {v}"
    if (v := row.get("stop")) is not None:
        if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and s for s in v):
            return "stop must be a list of non-empty strings"
        for i, s in enumerate(v):
            if reason := _text_problem(f"stop[{i}]", s, allow_empty=True):  # "\n" is a fine stop
                return reason
    return None


def validate_prompt_row(
    row: Mapping[str, Any],
    template: str,
    seen_ids: set[str] | None = None,
    max_prompt_chars: int | None = None,
) -> str | None:
    """Why `row` cannot be decoded under `template`, or None when it can.

    Never raises for anything in the row. When `seen_ids` is given, a well-formed id is
    added to it, so the first row with an id claims it and later ones are duplicates
    (even if the first row fails for another reason: an id maps to one outcome).
    Raises ValueError only for an unknown `template`, a caller bug.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    if not isinstance(row, Mapping):
        return f"row must be a mapping, got {type(row).__name__}"
    rid = row.get("id")
    if reason := _text_problem("id", rid):
        return reason
    if seen_ids is not None:
        if rid in seen_ids:
            return f"duplicate id {_show(rid)}"
        seen_ids.add(rid)
    return _text_input_problem(row, template, max_prompt_chars) or _options_problem(row)


def _is_str_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_str_type(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_list_of(t: pa.DataType, item: Callable[[pa.DataType], bool]) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and item(t.value_type)


def _is_message_type(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and all(
        t.get_field_index(n) >= 0 and _is_str_type(t.field(n).type) for n in ("role", "content")
    )


def _is_number_type(t: pa.DataType) -> bool:
    # Integers too: pandas writes an all-whole-number column such as temperature=[0, 1] as int64.
    return pa.types.is_floating(t) or pa.types.is_integer(t)


# Known column -> (accepts this Arrow type?, what we expected, for the message).
_COMPATIBLE: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    "id": (_is_str_type, "string"),
    "prompt": (_is_str_type, "string"),
    "document": (_is_str_type, "string"),
    "messages": (lambda t: _is_list_of(t, _is_message_type), "list<struct<role: string, content: string>>"),
    "max_new_tokens": (pa.types.is_integer, "an integer type"),
    "seed": (pa.types.is_integer, "an integer type"),
    "temperature": (_is_number_type, "a floating-point type"),
    "top_p": (_is_number_type, "a floating-point type"),
    "stop": (lambda t: _is_list_of(t, _is_str_type), "list<string>"),
}


def check_input_schema(schema: pa.Schema, template: str) -> None:
    """Refuse, before any row is read, an input whose columns cannot work with `template`.

    Raises SchemaError naming the column. A column of Arrow type null (every value null,
    as pandas writes it) is accepted where rows may leave it empty, but not where every
    row would then fail.
    """
    if template not in TEMPLATES:
        raise SchemaError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    listing = ", ".join(schema.names) or "(none)"
    repeated = sorted({n for n in schema.names if schema.names.count(n) > 1})
    if repeated:
        raise SchemaError(f"input has repeated column(s) {', '.join(map(repr, repeated))}; columns: {listing}")
    for field in schema:
        if field.name in _COMPATIBLE and not pa.types.is_null(field.type):
            accepts, expected = _COMPATIBLE[field.name]
            if not accepts(field.type):
                raise SchemaError(f"input column {field.name!r} has type {field.type}; expected {expected}")
    for needed, who in (("id",), "every job"), (TEMPLATE_COLUMNS[template], f"template {template!r}"):
        if not any(n in schema.names for n in needed):
            names = " or ".join(repr(n) for n in needed)
            raise SchemaError(f"input has no {names} column, which {who} needs; columns: {listing}")
        if all(pa.types.is_null(schema.field(n).type) for n in needed if n in schema.names):
            names = " / ".join(repr(n) for n in needed if n in schema.names)
            raise SchemaError(f"input column {names} is null in every row (type null), but {who} needs values")
    with_extra_columns(COMPLETIONS_SCHEMA, schema)  # refuses carried columns that clash with outputs


def validate_completion_row(row: Mapping[str, Any]) -> str | None:
    """Why a completion row breaks the contract, or None. A self-check; never raises."""
    if not isinstance(row, Mapping):
        return f"row must be a mapping, got {type(row).__name__}"
    if reason := _text_problem("id", row.get("id")):
        return reason
    if not isinstance(row.get("completion"), str):
        return f"completion must be a string, got {type(row.get('completion')).__name__}"
    if row.get("finish_reason") not in FINISH_REASONS:
        return f"finish_reason must be one of {'/'.join(FINISH_REASONS)}, got {_show(row.get('finish_reason'))}"
    if (mode := row.get("mode")) is not None and mode not in MODES:
        return f"mode must be one of {'/'.join(MODES)}, got {_show(mode)}"
    counts = ("prompt_tokens", "completion_tokens", "decode_steps", "draft_tokens_proposed",
              "draft_tokens_accepted", "bucket", "batch_index")  # fmt: skip
    for name in counts:
        if (v := row.get(name)) is not None and not (_is_int(v) and v >= 0):
            return f"{name} must be a non-negative integer, got {_show(v)}"
    for name in ("decode_seconds", "acceptance_length_mean"):
        if (v := row.get(name)) is not None and not (_is_real(v) and math.isfinite(v) and v >= 0):
            return f"{name} must be a non-negative finite number, got {_show(v)}"
    proposed, accepted = row.get("draft_tokens_proposed"), row.get("draft_tokens_accepted")
    if proposed is not None and accepted is not None and accepted > proposed:
        return f"draft_tokens_accepted ({accepted}) exceeds draft_tokens_proposed ({proposed})"
    if (hist := row.get("accepted_per_step")) is not None and not (
        isinstance(hist, (list, tuple)) and all(_is_int(h) and h >= 0 for h in hist)
    ):
        return "accepted_per_step must be a list of non-negative integers"
    ids, n = row.get("completion_token_ids"), row.get("completion_tokens")
    if isinstance(ids, (list, tuple)) and n is not None and len(ids) != n:
        return f"completion_tokens is {n} but completion_token_ids has {len(ids)}"
    return None
