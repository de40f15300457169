"""The output folder read as a whole: which ids are complete and which rows are dead, keyed by id.

Every run into an output adds parts (see ``_parts``); none deletes another's. So the job's
outcome is the union of all parts, keyed:
  1. a completion by its id: a retried bundle or a rerun that wrote an id twice counts it once;
  2. a dead letter by ``schemas.dead_letter_key`` (its id, or for a duplicate-id row or a row
     without id, its content): re-deriving it in a rerun or a second chunk counts it once;
  3. a dead letter whose id has a completion is dropped: a later run (a fixed row resent in a
     new chunk, a decode that failed once) completed it.
The rerun, ``job_stats.json``, ``audit`` and the run summary all count through here.
"""

from __future__ import annotations

import collections
import dataclasses
import io
from typing import Any

from apache_beam.io.filesystems import FileSystems

from dflash_batch.pipeline._io import COMPLETIONS_PREFIX, DEAD_LETTERS_PREFIX, PARQUET_SUFFIX, join, match_files
from dflash_batch.schemas import dead_letter_key

UNCLASSIFIED = "unclassified"  # the kind of a dead letter written before dead letters had kinds


def read_table(path: str, columns: list[str] | None = None):
    """A Parquet file through Beam's FileSystems (local or gs://), with only ``columns`` when given."""
    import pyarrow.parquet as pq

    with FileSystems.open(path, compression_type="uncompressed") as f:
        data = io.BytesIO(f.read())
    names = pq.ParquetFile(data).schema_arrow.names
    return pq.read_table(data, columns=[c for c in columns if c in names] if columns else None)


@dataclasses.dataclass(frozen=True)
class Outcomes:
    """What the parts in an output hold, each id counted once."""

    completed: frozenset[str]
    dead: dict[str, dict[str, Any]]  # dead-letter key -> one of its rows (id, kind, error, source)
    completion_files: tuple[str, ...]
    dead_files: tuple[str, ...]
    completion_rows: int  # rows in the completion files, duplicates included

    def dead_by_kind(self) -> dict[str, int]:
        """Dead letters per kind, most common first."""
        return dict(collections.Counter(d["kind"] for d in self.dead.values()).most_common())

    def dead_examples(self) -> dict[str, str]:
        """One error text per kind (the first by key, so the same every time)."""
        out: dict[str, str] = {}
        for key in sorted(self.dead):
            out.setdefault(self.dead[key]["kind"], self.dead[key]["error"])
        return out


def read_outcomes(output: str) -> Outcomes:
    """The union of the parts in ``output`` (see the module docstring)."""
    completion_files = match_files(join(output, f"{COMPLETIONS_PREFIX}*{PARQUET_SUFFIX}"))
    completed: set[str] = set()
    rows = 0
    for path in completion_files:
        ids = read_table(path, ["id"]).column("id").to_pylist()
        rows += len(ids)
        completed.update(ids)
    dead_files = match_files(join(output, f"{DEAD_LETTERS_PREFIX}*{PARQUET_SUFFIX}"))
    dead: dict[str, dict[str, Any]] = {}
    for path in dead_files:
        for row in read_table(path, ["id", "kind", "error", "source", "row_json"]).to_pylist():
            row.setdefault("kind", UNCLASSIFIED)
            key = dead_letter_key(row)
            if key not in completed:
                dead.setdefault(key, {k: row.get(k) for k in ("id", "kind", "error", "source")})
    return Outcomes(frozenset(completed), dead, tuple(completion_files), tuple(dead_files), rows)
