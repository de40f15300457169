"""Schema metadata: every contract names itself and carries a version."""

from __future__ import annotations

import pyarrow as pa

NAME_KEY = b"dflash_batch.schema"
VERSION_KEY = b"dflash_batch.schema_version"


class SchemaError(ValueError):
    """A file or input does not match the contract it is read as."""


def contract_metadata(name: str, version: int = 1) -> dict[bytes, bytes]:
    """The metadata every contract schema carries (survives a Parquet round trip)."""
    return {NAME_KEY: name.encode(), VERSION_KEY: str(version).encode()}


def _read(schema: pa.Schema, key: bytes) -> str:
    raw = (schema.metadata or {}).get(key)
    if raw is None:
        raise SchemaError(f"schema has no {key.decode()!r} metadata; was it written by dflash_batch?")
    return raw.decode(errors="replace")


def schema_name(schema: pa.Schema) -> str:
    """Which contract `schema` claims to be, e.g. "completions"."""
    return _read(schema, NAME_KEY)


def schema_version(schema: pa.Schema) -> int:
    """The contract version stored in `schema`'s metadata."""
    raw = _read(schema, VERSION_KEY)
    if not raw.isdigit():
        raise SchemaError(f"schema version {raw!r} is not an integer")
    return int(raw)
