"""The Beam pipeline of a dflash-batch job: Parquet prompts -> static batches -> decoder -> Parquet.

``build(argv, test_pipeline=None)`` checks a job (refusing a bad one before any work, with
``JobRefused``) and constructs its labelled steps; ``BuiltJob.run()`` runs it. The design
notes live with the code they explain: reruns and output layout in ``_pipeline``, batching in
``_batching``, model loading in ``_model``, job statistics in ``_stats`` (each time and
throughput figure defined once in ``_figures``), IO in ``_io``.
"""

from dflash_batch.pipeline._figures import Figures, format_rate, format_seconds, rate_line, time_line
from dflash_batch.pipeline._io import JOB_STATS_FILE, MANIFEST_FILE, RUN_STATS_PREFIX
from dflash_batch.pipeline._options import JobConfig, JobOptions
from dflash_batch.pipeline._pipeline import BuiltJob, JobResult, build, metrics_summary, new_run_id, run_job
from dflash_batch.pipeline._preflight import JobRefused
from dflash_batch.pipeline._progress import Progress, read_progress
from dflash_batch.pipeline._stats import job_totals, read_runs

__all__ = [
    "JOB_STATS_FILE", "MANIFEST_FILE", "RUN_STATS_PREFIX", "BuiltJob", "Figures", "JobConfig", "JobOptions",
    "JobRefused", "JobResult", "Progress", "build", "format_rate", "format_seconds", "job_totals",
    "metrics_summary", "new_run_id", "rate_line", "read_progress", "read_runs", "run_job", "time_line",
]  # fmt: skip
