"""Files through Beam's ``FileSystems``, so a local path and ``gs://`` behave the same.

Input is read with Beam's own ``ReadAllFromParquetBatched`` (splittable by row group, one
``pyarrow.Table`` per read, with the file name for dead letters), and turned into rows here
rather than by Beam's ``ReadFromParquet``: that one calls ``Table.to_pydict()``, which raises on
a string that is not valid UTF-8 and would kill the bundle. ``table_rows`` instead decodes such
strings with ``surrogateescape``, so the row reaches validation and becomes a dead letter whose
reason names the field ("prompt is not valid UTF-8 ...").

Output file names (``OUTPUT/completions-<run>-SSSSS-of-NNNNN.parquet``) carry the run id, so a
rerun never overwrites or deletes the completions of an earlier run (see ``_pipeline`` on reruns).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

COMPLETIONS_PREFIX = "completions-"
DEAD_LETTERS_PREFIX = "dead_letters-"
PARQUET_SUFFIX = ".parquet"
JOB_STATS_FILE = "job_stats.json"
RUN_STATS_PREFIX = "run_stats-"  # OUTPUT/run_stats-<run>.json: what each run did (see _stats)
MANIFEST_FILE = "job_manifest.json"
UNREADABLE = "__dflash_batch_unreadable__"  # the key of a row whose values could not be read


def use_anonymous_gcs_for_emulator() -> None:
    """With ``STORAGE_EMULATOR_HOST`` set, let Beam's GCS client connect anonymously at once.

    Beam looks credentials up with ~20 s of retries before it falls back to an anonymous
    client; an emulator needs none. Marking Beam's (process-wide, internal) credential cache
    as "looked up, none found" gives the anonymous client, which honours the emulator host.
    Nothing changes when no emulator is configured.
    """
    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    try:
        from apache_beam.internal.gcp import auth
    except ImportError:  # Beam without the gcp extra cannot read gs:// anyway
        return
    with auth._Credentials._credentials_lock:
        auth._Credentials._credentials = None
        auth._Credentials._credentials_init = True


def join(folder: str, name: str) -> str:
    return FileSystems.join(folder, name)


def match_files(pattern: str) -> list[str]:
    """Paths matching ``pattern`` (a path, glob or gs:// pattern), sorted; [] when none match.

    Raises Beam's BeamIOError when the listing itself fails (permissions, network).
    """
    return sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)


def parquet_footer(path: str) -> tuple[pa.Schema, int]:
    """The schema and row count of a Parquet file, from its footer only."""
    with FileSystems.open(path, compression_type="uncompressed") as f:
        meta = pq.ParquetFile(f).metadata
        return meta.schema.to_arrow_schema(), meta.num_rows


def read_json(path: str) -> Any | None:
    """The JSON document at ``path``, or None when there is none."""
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return json.loads(f.read().decode("utf-8"))


def write_json(path: str, value: Any) -> None:
    """Writes ``value`` as indented JSON (one object write; atomic on GCS)."""
    with FileSystems.create(path, mime_type="application/json", compression_type="uncompressed") as f:
        f.write((json.dumps(value, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def delete(paths: list[str]) -> None:
    if paths:
        FileSystems.delete(paths)


def _strings_as_binary(t: pa.DataType) -> pa.DataType:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.binary()
    if pa.types.is_list(t):
        return pa.list_(_strings_as_binary(t.value_type))
    if pa.types.is_large_list(t):
        return pa.large_list(_strings_as_binary(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _strings_as_binary(f.type)) for f in t])
    return t


def _decode_strings(value: Any, t: pa.DataType) -> Any:
    """Undo ``_strings_as_binary`` on one value; bad bytes become lone surrogates."""
    if value is None:
        return None
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return value.decode("utf-8", "surrogateescape")
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return [_decode_strings(v, t.value_type) for v in value]
    if pa.types.is_struct(t):
        return {f.name: _decode_strings(value.get(f.name), f.type) for f in t}
    return value


def _column_values(column: pa.ChunkedArray) -> list[Any]:
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        binary = column.cast(_strings_as_binary(column.type))
        return [_decode_strings(v, column.type) for v in binary.to_pylist()]


def table_rows(table: pa.Table) -> Iterator[dict[str, Any]]:
    """The rows of ``table`` as dicts; invalid UTF-8 becomes lone surrogates, never an error.

    A column that cannot be converted at all (an exotic type) comes back as ``{UNREADABLE: why}``
    rows, so each becomes a dead letter and the row count still adds up.
    """
    columns: dict[str, list[Any]] = {}
    for name, column in zip(table.column_names, table.columns):
        try:
            columns[name] = _column_values(column)
        except Exception as e:  # noqa: BLE001 - an error here must become data, not a failed bundle
            reason = f"column {name!r} could not be read: {type(e).__name__}: {e}"
            yield from ({UNREADABLE: reason} for _ in range(table.num_rows))
            return
    for i in range(table.num_rows):
        yield {name: values[i] for name, values in columns.items()}
