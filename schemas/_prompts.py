"""The prompts contract: the input rows a job reads."""

from __future__ import annotations

import pyarrow as pa

from ._meta import contract_metadata

# Prompt templates a job can name, and the columns each one reads.
TEMPLATES = ("none", "summarize")
TEMPLATE_COLUMNS: dict[str, tuple[str, ...]] = {"none": ("prompt", "messages"), "summarize": ("document",)}
MESSAGE_ROLES = ("system", "user", "assistant", "tool")

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

# Every column the project understands. All are nullable: input comes from users, and a
# null where a value is needed is a per-row dead letter, not a file-level failure.
PROMPTS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("messages", pa.list_(MESSAGE_TYPE)),
        ("document", pa.string()),
        ("max_new_tokens", pa.int32()),
        ("temperature", pa.float32()),
        ("top_p", pa.float32()),
        ("seed", pa.int64()),
        ("stop", pa.list_(pa.string())),
    ],
    metadata=contract_metadata("prompts"),
)

# Any other input column is the user's, carried through to completions untouched.
PROMPT_COLUMNS: frozenset[str] = frozenset(PROMPTS_SCHEMA.names)
