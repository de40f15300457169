"""Durable output: completions and dead letters reach their final files while the job runs.

A job's rows are written in "parts": Parquet files of at most ``rows_per_file`` rows, each
written as soon as it is full, or ``PART_SECONDS`` after its first row, or at the end of its
bundle. So a run that dies keeps every part written before, and a rerun decodes only the ids
without a completion (see ``_pipeline`` on reruns).

Why not Beam's ``WriteToParquet``: it writes into a per-run ``beam-temp-*`` folder and moves the
files into place only when the whole write finalizes, at the end of the run; a run that dies at
99% keeps nothing. Its file names are shard numbers, which a retried bundle cannot reproduce.
Parts are written here with Beam's ``FileSystems`` instead (so ``gs://`` works as a local folder
does), in two steps:
  1. write the part to a temporary name beside its final one (``<final>.partial-<random>``,
     which no reader's ``*.parquet`` pattern matches);
  2. rename it to its final name, which is derived from the keys of the rows it holds (a hash
     of their sorted ids). A retried bundle that cuts the same rows rewrites the same file, so a
     retry adds no copy. A retry that cuts them differently (a time-flushed part) writes rows
     whose ids are already in another part; readers key by id (``_outcomes``), so such a
     duplicate never counts twice.
A local rename is atomic, and a GCS object appears whole or not at all, so a reader sees whole
parts only. A crash loses at most the rows buffered for the next part of each worker.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
import uuid
from typing import Any, Dict, Iterable, Sequence, Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from dflash_batch.pipeline._io import PARQUET_SUFFIX, join

PART_ROWS = 1000  # rows per part when the job sets pipeline.rows_per_file = 0
PART_SECONDS = 60.0  # a slow job still saves its progress at least this often (per worker)
PARTIAL = ".partial-"  # marks a part being written: OUTPUT/<final name>.partial-<random>

# Closing writes (an interrupted run, see ``close_writes``) waits for a rename in flight, so once
# it returns, what the output holds is final for this process and can be reported as kept.
_renames = threading.Lock()
_closed = threading.Event()


def close_writes() -> None:
    """No part of this process is renamed into place after this returns (a stopping run)."""
    with _renames:
        _closed.set()


def part_name(prefix: str, keys: Iterable[str]) -> str:
    """The file name of the part holding the rows with ``keys``: the same rows, the same name."""
    text = "\n".join(sorted(keys)).encode("utf-8", "surrogatepass")
    return f"{prefix}{hashlib.blake2b(text, digest_size=16).hexdigest()}{PARQUET_SUFFIX}"


def write_part(output: str, prefix: str, schema: pa.Schema, rows: Sequence[dict[str, Any]],
               keys: Sequence[str]) -> str:
    """Writes ``rows`` (with ``keys``) as one part under ``output``; returns its final path."""
    final = join(output, part_name(prefix, keys))
    temporary = f"{final}{PARTIAL}{uuid.uuid4().hex[:12]}"
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(list(rows), schema=schema), buffer, compression="snappy")
    with FileSystems.create(temporary, mime_type="application/octet-stream", compression_type="uncompressed") as f:
        f.write(buffer.getvalue())
    with _renames:
        if _closed.is_set():
            FileSystems.delete([temporary])
            raise RuntimeError("this run is stopping: no more parts are saved")
        if FileSystems.exists(final):  # a retry of the same rows: the new copy replaces the old one
            FileSystems.delete([final])
        FileSystems.rename([temporary], [final])
    return final


class PartBuffer:
    """Rows waiting for their part; ``add`` writes a part when one is due."""

    def __init__(self, output: str, prefix: str, schema: pa.Schema, rows_per_file: int,
                 max_seconds: float = PART_SECONDS):
        self.output, self.prefix, self.schema = output, prefix, schema
        self.rows_per_file, self.max_seconds = rows_per_file, max_seconds
        self.rows: list[dict[str, Any]] = []
        self.keys: list[str] = []
        self.since: float | None = None
        self.written: list[str] = []

    def add(self, rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
        """Buffers ``rows``; writes the buffer once it holds ``rows_per_file`` rows or is ``max_seconds`` old."""
        if not rows:
            return
        if self.since is None:
            self.since = time.monotonic()
        self.rows.extend(rows)
        self.keys.extend(keys)
        if len(self.rows) >= self.rows_per_file or time.monotonic() - self.since >= self.max_seconds:
            self.flush()

    def flush(self) -> None:
        """Writes what is buffered as one part (nothing when empty)."""
        if self.rows:
            self.written.append(write_part(self.output, self.prefix, self.schema, self.rows, self.keys))
        self.rows, self.keys, self.since = [], [], None


@beam.typehints.with_output_types(Tuple[int, Dict[str, Any]])
class KeyForParts(beam.DoFn):
    """row -> (0, row): one group, which ``WriteParts`` cuts into parts."""

    def process(self, row: dict[str, Any]):
        yield 0, row


class WriteParts(beam.DoFn):
    """(key, [row]) -> the paths of the parts holding those rows (``prefix``, keyed by ``key_of``).

    The rows are sorted by key and cut every ``rows_per_file`` rows, so the same rows always make
    the same parts: a rerun that derives them again rewrites its files rather than adding copies.
    """

    def __init__(self, output: str, prefix: str, schema: pa.Schema, key_of, rows_per_file: int):
        self.output, self.prefix, self.schema, self.key_of = output, prefix, schema, key_of
        self.rows_per_file = rows_per_file

    def setup(self):
        from dflash_batch.pipeline._io import use_anonymous_gcs_for_emulator

        use_anonymous_gcs_for_emulator()

    def process(self, element: tuple[int, Iterable[dict[str, Any]]]):
        keyed = sorted(((self.key_of(r), r) for r in element[1]), key=lambda kr: kr[0])
        for i in range(0, len(keyed), self.rows_per_file):
            chunk = keyed[i: i + self.rows_per_file]
            yield write_part(self.output, self.prefix, self.schema, [r for _, r in chunk], [k for k, _ in chunk])
