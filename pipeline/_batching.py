"""Length buckets and static batches: ``GroupIntoBatches`` keyed by (bucket, shard).

Each request is keyed by its prompt-length bucket (the decoder's static padded prompt length)
and a shard, ``crc32(id) % shards_per_bucket``; ``GroupIntoBatches(rows_per_batch)`` then cuts
each key's rows into batches of exactly ``rows_per_batch``, with one partial batch per key at
the end. The decoder streams a batch through its ``batch_size`` slots and refills a slot as
soon as its row finishes, so ``rows_per_batch`` is a multiple of ``batch_size`` (4x by
default): slots stay full until the last ``batch_size`` rows of a batch.

Why not ``BatchElements(length_fn=..., bucket_boundaries=...)`` (Beam 2.77):
  * Its length bucketing exists only on its stateful path (``max_batch_duration_secs``), keyed
    by (per-process random UUID, bucket). Every upstream worker process then leaves its own
    partial tail per bucket, and which rows share a batch and how many keys exist (decode
    parallelism) change from run to run. Keying by (bucket, shard) gives ``buckets x shards``
    stable keys, whose number we choose to match the decode workers.
  * Its batch size adapts between min and max to measured timings; static shapes want one size.
  * Its boundaries are lower-inclusive (``[10, 50)``) while the decoder's buckets are upper-
    inclusive (``len <= 64``): a second, off-by-one copy of the bucket table.
  * Without the stateful path it batches only within a bundle, and a Parquet row group is a
    bundle: every file would end each bucket with a padded partial batch.

Runner note: Beam 2.77's ``DirectRunner`` sends a pipeline with ``GroupIntoBatches`` (which
declares a processing-time timer even when unused) to its legacy in-process runner, which
ignores ``direct_running_mode`` and loses the metrics of batches flushed at the end of the
window. ``build`` therefore runs local jobs on the ``FnApiRunner`` (the DirectRunner's batch
engine) directly, where multi-processing and metrics work as they should.

Spreading the batches: ``GroupIntoBatches`` is stateful, and the FnApiRunner runs a stateful
stage in one worker process (state is keyed; it does not partition by key). Fused into that
stage, Decode ran there too: with 2 workers, one decoded 9,888 of 10,000 rows. A ``Reshuffle``
between them ends the stage, so the batches, now plain elements, are split among all workers
(and on Dataflow, a retried Decode bundle re-reads the same, already materialized batches).
"""

from __future__ import annotations

import zlib
from typing import Tuple

import apache_beam as beam

from dflash_batch.pipeline._tokenize import Prepared


def shard_of(rid: str, shards: int) -> int:
    """A stable shard for an id (Python's ``hash`` is salted per process, so not that)."""
    return zlib.crc32(rid.encode("utf-8", "surrogatepass")) % shards


# Typed, so GroupIntoBatches' state is keyed with a deterministic coder (ints, not pickles).
@beam.typehints.with_output_types(Tuple[Tuple[int, int], Prepared])
class KeyByBucket(beam.DoFn):
    """Prepared -> ((bucket, shard), Prepared)."""

    def __init__(self, shards_per_bucket: int):
        self.shards = shards_per_bucket

    def process(self, item: Prepared):
        yield (item.bucket, shard_of(item.id, self.shards)), item


def static_batches(rows_per_batch: int) -> beam.PTransform:
    """((bucket, shard), Prepared) -> ((bucket, shard), [Prepared, ...]) of ``rows_per_batch``."""
    return beam.GroupIntoBatches(rows_per_batch)
