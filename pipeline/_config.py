"""What the pipeline's steps read: the job spec as given, plus the values ``build`` derives from it.

The spec (``jobs.JobSpec``: frozen dataclasses, validated when it was made) holds every setting
with its default; the pipeline reads it by attribute and never imports ``jobs``. ``JobConfig``
adds only what is derived: absolute locations, the resolved drafter and dtype, and the batching defaults
for this runner. It is pickled into the DoFns, spec included (a Dataflow worker's container
installs the package that defines the spec's dataclasses).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

from dflash_batch.decoder import ROWS_PER_SLOT
from dflash_batch.pipeline._parts import PART_ROWS


@dataclasses.dataclass(frozen=True)
class JobConfig:
    spec: Any  # the job spec (jobs.JobSpec); spec.decode is the decoder's DecodeConfig
    input: str  # absolute path, glob or gs:// pattern
    output: str  # absolute folder or gs:// prefix, without a trailing "/"
    drafter: str | None  # the resolved drafter location in modes with a drafter, else None
    rows_per_batch: int  # rows per decoder call: pipeline.rows_per_batch, 0 meaning ROWS_PER_SLOT x batch_size
    shards_per_bucket: int  # keys per bucket: pipeline.shards_per_bucket, 0 meaning the runner's workers
    rows_per_file: int  # rows per completion / dead-letter part: pipeline.rows_per_file, 0 meaning PART_ROWS
    progress_dir: str | None  # local folder for live progress (local runs), or None
    dtype: str | None = None  # the resolved [model] dtype (bfloat16/float32); set with the drafter, by the preflight
    # The target's context (max_position_embeddings), once build has read it: a longer prompt is a dead letter.
    context_tokens: int | None = None
    # Rows in the job's input as the preflight counted them (None: not counted, e.g. on Dataflow):
    # a worker's decoder may get at most this many, which bounds the work a compile can pay back over.
    rows_in: int | None = None


def job_config(spec: Any, options: PipelineOptions, progress_dir: str | None = None) -> JobConfig:
    """``spec``'s JobConfig under Beam ``options``, before the preflight resolves the drafter."""
    return JobConfig(
        spec=spec, input=_absolute(spec.input), output=_absolute(spec.output).rstrip("/"), drafter=None,
        rows_per_batch=spec.pipeline.rows_per_batch or ROWS_PER_SLOT * spec.decode.batch_size,
        shards_per_bucket=spec.pipeline.shards_per_bucket or _worker_count(options),
        rows_per_file=spec.pipeline.rows_per_file or PART_ROWS, progress_dir=progress_dir)


def _absolute(location: str) -> str:
    return location if "://" in location else os.path.abspath(location)


def _worker_count(options: PipelineOptions) -> int:
    """How many processes may decode at once: one key per bucket for each of them."""
    all_options = options.get_all_options(retain_unknown_options=True)
    if all_options.get("runner") in (None, "DirectRunner", "direct", "FnApiRunner"):
        return max(1, int(all_options.get("direct_num_workers") or 1))
    return max(1, int(all_options.get("max_num_workers") or all_options.get("num_workers") or 1))
