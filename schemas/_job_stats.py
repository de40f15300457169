"""The job stats contract: one record per job, what `audit` reads."""

from __future__ import annotations

import pyarrow as pa

from ._meta import contract_metadata

JOB_STATS_SCHEMA = pa.schema(
    [
        pa.field("job_id", pa.string(), nullable=False),
        ("spec_json", pa.string()),  # the job spec as run, so a record is self-describing
        ("rows_in", pa.int64()),
        ("completions_out", pa.int64()),
        ("dead_letters", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("wall_seconds", pa.float64()),
        ("decode_seconds", pa.float64()),
        ("compile_seconds", pa.float64()),
        ("tokens_per_s", pa.float64()),  # completion tokens / wall seconds
        ("tau_mean", pa.float64()),
        ("tau_histogram", pa.list_(pa.int64())),  # summed accepted_per_step
        ("padding_waste_json", pa.string()),  # {bucket: wasted fraction of padded positions}
        ("mode", pa.string()),
        ("block_size", pa.string()),  # a string because a spec may say "auto:8"
        ("batch_size", pa.int32()),
        ("hardware", pa.string()),
        ("model", pa.string()),
        ("drafter", pa.string()),
        ("dtype", pa.string()),  # the model's resolved dtype (bfloat16 / float32)
    ],
    metadata=contract_metadata("job_stats"),
)
