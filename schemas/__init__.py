"""Arrow/Parquet contracts of every file dflash_batch reads or writes, and their validation.

Each schema carries its name and version in metadata (see `schema_version`). Row
validators return a human-readable reason string, or None, and never raise mid-job.
"""

from ._completions import COMPLETIONS_SCHEMA, FINISH_REASONS, MODES, with_extra_columns
from ._dead_letters import DEAD_LETTER_KINDS, DEAD_LETTERS_SCHEMA, dead_letter_key, dead_letter_row, row_to_json
from ._histogram import add_histograms, committed_tokens, observed_range, tau_from_histogram
from ._job_stats import JOB_STATS_SCHEMA
from ._meta import SchemaError, schema_name, schema_version
from ._prompts import MESSAGE_ROLES, PROMPT_COLUMNS, PROMPTS_SCHEMA, TEMPLATES
from ._validate import check_input_schema, validate_completion_row, validate_prompt_row

__all__ = [
    "COMPLETIONS_SCHEMA", "DEAD_LETTER_KINDS", "DEAD_LETTERS_SCHEMA", "JOB_STATS_SCHEMA", "PROMPTS_SCHEMA",
    "FINISH_REASONS", "MESSAGE_ROLES", "MODES", "PROMPT_COLUMNS", "TEMPLATES", "SchemaError",
    "add_histograms", "check_input_schema", "committed_tokens", "dead_letter_key", "dead_letter_row", "observed_range",
    "row_to_json", "schema_name", "schema_version", "tau_from_histogram",
    "validate_completion_row", "validate_prompt_row", "with_extra_columns",
]  # fmt: skip
