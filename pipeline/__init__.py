"""The Beam pipeline of a dflash-batch job: Parquet prompts -> static batches -> decoder -> Parquet.

``build(argv, test_pipeline=None)`` checks a job (refusing a bad one before any work, with
``JobRefused``) and constructs its labelled steps; ``BuiltJob.run()`` runs it. The design
notes live with the code they explain: reruns and output layout in ``_pipeline``, batching in
``_batching``, model loading in ``_model``, job statistics in ``_stats``, IO in ``_io``.
"""

from dflash_batch.pipeline._io import JOB_STATS_FILE, MANIFEST_FILE
from dflash_batch.pipeline._options import JobConfig, JobOptions
from dflash_batch.pipeline._pipeline import BuiltJob, JobResult, build, metrics_summary, new_run_id, run_job
from dflash_batch.pipeline._preflight import JobRefused
from dflash_batch.pipeline._progress import read_progress
from dflash_batch.pipeline._templates import SUMMARIZE_INSTRUCTION, summarize_messages

__all__ = [
    "JOB_STATS_FILE", "MANIFEST_FILE", "SUMMARIZE_INSTRUCTION", "BuiltJob", "JobConfig", "JobOptions", "JobRefused", "JobResult",
    "build", "metrics_summary", "new_run_id", "read_progress", "run_job", "summarize_messages",
]  # fmt: skip
