"""Checks that refuse a job before any work starts, each naming what is wrong.

Everything here reads metadata only: the input files' Parquet footers (schemas and row counts),
the model's and drafter's config.json, and the output folder's listing and manifest. A refusal
is a ``JobRefused`` whose ``field`` is the job-spec field to fix.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pyarrow as pa

from dflash_batch.decoder import DRAFTER_MODES
from dflash_batch.pipeline._io import COMPLETIONS_PREFIX, MANIFEST_FILE, PARQUET_SUFFIX, join, match_files, \
    parquet_footer, read_json
from dflash_batch.pipeline._model import check_drafter, drafter_block_size, job_dtype, model_config_exists
from dflash_batch.pipeline._config import JobConfig
from dflash_batch.schemas import COMPLETIONS_SCHEMA, SchemaError, check_input_schema, with_extra_columns

_GLOB_CHARS = set("*?[")


class JobRefused(ValueError):
    """A job that must not start; ``str()`` reads "FIELD: reason"."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Preflight:
    files: tuple[str, ...]
    input_schema: pa.Schema
    rows_in: int  # from the footers, for progress; the job counts rows itself
    completions_schema: pa.Schema
    previous_completions: tuple[str, ...]  # completion files an earlier run left in the output
    drafter: str | None  # resolved location (mode dflash only)
    manifest: dict
    plan: Any = None  # the memory plan on this machine's devices (local runs; MemoryPlan)
    dtype: str | None = None  # the resolved [model] dtype; None: not read from the checkpoint (see build)


# What a manifest written before the dtype was a setting means by its absence: every run was float32.
_MANIFEST_DEFAULTS = {"dtype": "float32"}


def result_manifest(config: JobConfig) -> dict:
    """The settings that decide a row's completion. Rows completed under other settings must not
    be skipped as done, so a rerun into the same output must match these. The dtype is the
    resolved one: "auto" and the dtype it resolves to make the same completions."""
    s = config.spec
    return {"model": s.model.target, "dtype": config.dtype or job_dtype(s),
            "template": s.prompt.template,
            "instruction": s.prompt.instruction if s.prompt.template == "summarize" else None,
            "max_new_tokens": s.decode.max_new_tokens, "temperature": s.decode.temperature,
            "top_p": s.decode.top_p, "seed": s.decode.seed,
            # Only when set, so outputs made before the setting existed still match.
            **({"truncate": s.prompt.truncate} if s.prompt.truncate != "none" else {})}


def _inputs(pattern: str) -> tuple[list[str], list[pa.Schema], int]:
    if pattern.endswith("/") or ("://" not in pattern and os.path.isdir(pattern)):
        pattern = join(pattern.rstrip("/"), f"*{PARQUET_SUFFIX}")  # a folder means its Parquet files
    try:
        files = match_files(pattern)
    except Exception as e:  # noqa: BLE001 - e.g. no permission to list the bucket
        raise JobRefused("input", f"{pattern!r} cannot be listed ({type(e).__name__}: {e})") from None
    if not files:
        if _GLOB_CHARS & set(pattern):
            raise JobRefused("input", f"{pattern!r} matches no files")
        raise JobRefused("input", f"{pattern!r} does not exist")
    schemas, rows = [], 0
    for path in files:
        try:
            schema, n = parquet_footer(path)
        except Exception as e:  # noqa: BLE001 - any failure to read a footer is a refusal
            raise JobRefused("input", f"{path} is not a readable Parquet file ({type(e).__name__}: {e})") from None
        schemas.append(schema)
        rows += n
    return files, schemas, rows


def _unify(files: list[str], schemas: list[pa.Schema], template: str) -> pa.Schema:
    for path, schema in zip(files, schemas):
        try:
            check_input_schema(schema, template)
        except SchemaError as e:
            raise JobRefused("input", f"{path}: {e}") from None
    try:
        # Permissive: files that differ only in width (int32 and int64, float and double) make
        # one column of the wider type; a real conflict (int and string) still refuses.
        return pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise JobRefused("input", f"the input files' columns disagree: {e}") from None


def preflight(config: JobConfig) -> Preflight:
    """Refuses (JobRefused) what cannot work; returns what the pipeline needs to know."""
    spec = config.spec
    files, schemas, rows_in = _inputs(config.input)
    schema = _unify(files, schemas, spec.prompt.template)
    try:
        completions_schema = with_extra_columns(COMPLETIONS_SCHEMA, schema)
    except SchemaError as e:
        raise JobRefused("input", str(e)) from None

    try:
        checkpoint = model_config_exists(spec.model.target)
    except ValueError as e:
        raise JobRefused("model.target", str(e)) from None
    try:
        config = dataclasses.replace(config, dtype=job_dtype(spec, checkpoint))
    except ValueError as e:  # DtypeError: a checkpoint dtype "auto" has no rule for
        raise JobRefused("model.dtype", str(e)) from None
    drafter = None
    if spec.decode.mode in DRAFTER_MODES:
        try:
            drafter = check_drafter(spec.model.target, spec.model.drafter)
            limit = drafter_block_size(drafter)
        except ValueError as e:
            raise JobRefused("model.drafter", str(e)) from None
        if spec.decode.block_size != "auto" and not 1 <= spec.decode.block_size <= limit:
            raise JobRefused("decode.block_size", f"must be 'auto' or in [1, {limit}] (the drafter's block size), "
                                                  f"got {spec.decode.block_size}")

    manifest = result_manifest(config)
    try:
        previous = match_files(join(config.output, f"{COMPLETIONS_PREFIX}*{PARQUET_SUFFIX}"))
        earlier = read_json(join(config.output, MANIFEST_FILE))
    except Exception as e:  # noqa: BLE001
        raise JobRefused("output", f"{config.output!r} cannot be read ({type(e).__name__}: {e})") from None
    if earlier is not None:
        earlier = {**_MANIFEST_DEFAULTS, **earlier}
    if earlier is not None and earlier != manifest:
        changed = ", ".join(f"{k} {earlier.get(k)!r} -> {v!r}" for k, v in manifest.items() if earlier.get(k) != v)
        raise JobRefused("output", f"{config.output} holds completions made with other settings ({changed}); "
                                   "a rerun would mix them. Use a new output folder or empty this one")
    if previous and earlier is None:
        raise JobRefused("output", f"{config.output} already holds completion files but no {MANIFEST_FILE}, so "
                                   "they cannot be checked against this job. Use a new output folder or empty this one")
    return Preflight(tuple(files), schema, rows_in, completions_schema, tuple(previous), drafter, manifest,
                     dtype=config.dtype)


LAYOUT_FIELDS = {"data_parallel": "decode.data_parallel", "tensor_parallel": "decode.tensor_parallel",
                 "batch_size": "decode.batch_size", "max_new_tokens": "decode.max_new_tokens",
                 "prompt_buckets": "decode.prompt_buckets", "dtype": "model.dtype"}


def check_layout(config: JobConfig, chips: int | None = None, capacity: int | None = None, where: str = "",
                 topology_field: str = "decode.batch_size", dtype: str | None = None):
    """The job's mesh layout and memory plan with its model in ``dtype`` (default: the job's
    resolved dtype) on ``chips`` chips of
    ``capacity`` bytes (default: this machine's devices), or JobRefused naming the setting to
    change (``topology_field`` when only more or larger chips would do)."""
    from dflash_batch.decoder import LayoutError
    from dflash_batch.pipeline._decode import model_key
    from dflash_batch.pipeline._model import layout

    try:
        return layout(model_key(config), chips, capacity, where, dtype=dtype)
    except LayoutError as e:
        field = LAYOUT_FIELDS.get(e.setting, topology_field)
        if e.options:  # the model does not fit: every change that would, named by its job-spec field
            shown = "; ".join(_option(name, value, topology_field) for name, value in e.options)
            raise JobRefused(field, f"{e.problem}. What fits: {shown}") from None
        raise JobRefused(field, str(e)) from None


def _option(setting: str, value: str, topology_field: str) -> str:
    if setting != "topology":
        return f"{LAYOUT_FIELDS[setting]} = {value}"
    return f"a larger {topology_field}" if topology_field.startswith("runner.") else "a machine with more device memory"
