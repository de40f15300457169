"""The Beam pipeline of a dflash-batch job: Parquet prompts -> static batches -> decoder -> Parquet.

``build(spec, ...)`` takes a job spec (``jobs.JobSpec``), checks the job (refusing a bad one before
any work, with ``JobRefused``) and constructs its labelled steps; ``BuiltJob.run()`` runs it. The
design notes live with the code they explain: reruns and output layout in ``_pipeline``, batching
in ``_batching``, model loading in ``_model``, job statistics in ``_stats`` (each time and
throughput figure defined once in ``_figures``), IO in ``_io``.
"""

from dflash_batch.pipeline._config import JobConfig, job_config
from dflash_batch.pipeline._decode import model_key
from dflash_batch.pipeline._figures import Figures, format_rate, format_seconds, rate_line, time_line
from dflash_batch.pipeline._io import COMPLETIONS_PREFIX, DEAD_LETTERS_PREFIX, JOB_STATS_FILE, MANIFEST_FILE, \
    PARQUET_SUFFIX, RUN_STATS_PREFIX, join, match_files, parquet_footer, read_json, table_rows, \
    use_anonymous_gcs_for_emulator
from dflash_batch.pipeline._outcomes import Outcomes, read_outcomes, read_table
from dflash_batch.pipeline._parts import close_writes
from dflash_batch.pipeline._model import ModelKey, describe_devices, layout, model_configs, shared_model, \
    shared_tokenizer
from dflash_batch.pipeline._pipeline import BuiltJob, JobResult, build, metrics_summary, new_run_id
from dflash_batch.pipeline._preflight import LAYOUT_FIELDS, JobRefused, Preflight, check_layout, result_manifest
from dflash_batch.pipeline._progress import Progress, read_progress
from dflash_batch.pipeline._stats import job_totals, read_runs
from dflash_batch.pipeline._tokenize import prepare_row

__all__ = [
    "COMPLETIONS_PREFIX", "DEAD_LETTERS_PREFIX", "JOB_STATS_FILE", "MANIFEST_FILE", "PARQUET_SUFFIX",
    "RUN_STATS_PREFIX", "build", "BuiltJob", "check_layout", "close_writes",
    "describe_devices", "Figures", "format_rate", "format_seconds", "job_config", "job_totals", "JobConfig",
    "JobRefused", "JobResult", "join", "LAYOUT_FIELDS", "layout", "match_files", "metrics_summary", "model_configs",
    "model_key", "ModelKey", "new_run_id", "Outcomes", "read_outcomes", "read_table", "parquet_footer", "Preflight",
    "prepare_row", "Progress", "rate_line", "read_json", "read_progress", "read_runs", "result_manifest",
    "shared_model", "shared_tokenizer", "table_rows", "time_line", "use_anonymous_gcs_for_emulator",
]  # fmt: skip

# The model's dtype: "auto" resolved for where a job runs, and the checkpoint config it reads.
from dflash_batch.pipeline._model import job_dtype, model_config_exists  # noqa: E402

__all__ += ["job_dtype", "model_config_exists"]
