"""The job spec: a TOML file a user writes, ``--set section.key=value`` overrides, and validation.

A spec is refused before any work starts, with every problem listed and each naming its field
("decode.batch_size must be a positive integer, got 0"). Unknown sections and keys are errors
too (with a suggestion), since a misspelt key silently keeping its default would change a job.

    name = "aclsum-summarize"              # letters, digits, . _ -; names the job's records
    input = "prompts/*.parquet"            # local path/glob or gs:// pattern
    output = "out/aclsum"                  # local folder or gs:// prefix

    [model]
    target = "smollm2-135m-instruct"       # registered name, folder or gs:// prefix
    drafter = "default"                    # default | folder | gs:// | none (used by mode dflash)
    # config = "qwen3-8b.config.json"     # optional, for `submit`: a local config.json (or a known
    # drafter_config = "..."               #   model's name) to plan a gs:// target's (drafter's) memory
    dtype = "auto"                         # auto | bfloat16 | float32: weights, activations, caches;
                                           #   auto: bf16 on TPU/GPU, the faster one on CPU

    [decode]
    mode = "ar"                            # ar | dflash | ngram | hybrid
    block_size = "auto"                    # verified block length of dflash/ngram; auto: measured
    batch_size = 8                         # decoder slots per static batch (a worker's global batch)
    data_parallel = "auto"                 # replicas over the worker's chips; auto: the chips left by
    tensor_parallel = "auto"               #   the smallest tensor-parallel degree that fits memory
    max_new_tokens = 256                   # the static completion capacity; rows may ask for less
    temperature = 0.0                      # defaults for rows that leave these null
    top_p = 1.0
    seed = 0                               # rows without a seed derive one from this and their id
    prompt_buckets = [64, 128, 256, 512, 1024, 2048]
    prefill_chunk = 64                     # prompt tokens per prefill pass
    chunk_steps = 16                       # decode steps between the host's looks at the batch

    [prompt]
    template = "summarize"                 # none (prompt or messages as given) | summarize (document)
    instruction = "Summarize the following text in a few sentences."
    truncate = "none"                      # none: a prompt past the context / largest bucket is a dead letter | left: cut its start

    [pipeline]
    rows_per_batch = 0                     # rows per decoder call; 0 = 4 x batch_size
    shards_per_bucket = 0                  # keys per bucket (decode parallelism); 0 = number of workers
    rows_per_file = 0                      # rows per completion / dead-letter file, saved as the job goes; 0 = 1000
    output_shards = 0                      # no longer used (files are saved as the job goes); accepted so old jobs load

    [runner]
    name = "direct"                        # direct | dataflow (dataflow: `submit`, see below)
    direct_num_workers = 1
    direct_running_mode = "in_memory"      # in_memory | multi_threading | multi_processing
    # Dataflow keys, accepted and type-checked here, used by Dataflow submission:
    # project, region, zone, temp_location, staging_location, tpu_type, tpu_topology,
    # machine_type, sdk_container_image, disk_size_gb, max_workers

The ``[decode]`` keys are the decoder's own ``DecodeConfig`` (its defaults and checks) plus the
per-row sampling defaults. Relative local paths are relative to the current directory. Defaults
are written into the job stats (``spec_json``), so nothing that shaped a job's output is
implicit after the fact.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from dflash_batch.decoder import DEFAULT_MODEL, DRAFTER_MODES, DTYPES, DecodeConfig, DecodeConfigError
from dflash_batch.decoder import SUMMARIZE_INSTRUCTION
from dflash_batch.schemas import TEMPLATES

RUNNERS = ("direct", "dataflow")
RUNNING_MODES = ("in_memory", "multi_threading", "multi_processing")
DATAFLOW_STR_KEYS = ("project", "region", "zone", "temp_location", "staging_location", "tpu_type", "tpu_topology",
                     "machine_type", "sdk_container_image")
DATAFLOW_INT_KEYS = ("disk_size_gb", "max_workers")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class SpecError(ValueError):
    """A job spec that must not run; the message lists every problem, each naming its field."""

    def __init__(self, problems: Sequence[str], source: str = "job spec"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} is invalid:\n{lines}" if len(self.problems) > 1
                         else f"{source} is invalid: {self.problems[0]}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    target: str = DEFAULT_MODEL
    drafter: str = "default"
    dtype: str = "auto"  # one of DTYPES; the pipeline resolves "auto" (decoder.resolve_dtype)
    config: str | None = None  # a local config.json (or a known model's name) to plan a gs:// target with
    drafter_config: str | None = None  # the same for a gs:// drafter (see jobs._plan_configs)


@dataclasses.dataclass(frozen=True)
class DecodeSpec(DecodeConfig):
    """The ``[decode]`` section: the decoder's config (its fields, defaults and checks) plus the
    sampling defaults of rows that leave theirs null. A ``Decoder`` takes it as it is."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        for name, check in (("temperature", _temperature), ("top_p", _top_p), ("seed", _integer)):
            if (problem := check(getattr(self, name))) is not None:
                out.append((name, problem))
        return out


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    template: str = "none"
    instruction: str = SUMMARIZE_INSTRUCTION
    truncate: str = "none"


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    rows_per_batch: int = 0
    shards_per_bucket: int = 0
    rows_per_file: int = 0
    output_shards: int = 0


@dataclasses.dataclass(frozen=True)
class RunnerSpec:
    name: str = "direct"
    direct_num_workers: int = 1
    direct_running_mode: str = "in_memory"
    project: str | None = None
    region: str | None = None
    zone: str | None = None
    temp_location: str | None = None
    staging_location: str | None = None
    tpu_type: str | None = None
    tpu_topology: str | None = None
    machine_type: str | None = None
    sdk_container_image: str | None = None
    disk_size_gb: int | None = None
    max_workers: int | None = None

    def worker_env(self) -> dict[str, str]:
        """The TPU variables of this job's Dataflow workers, from its machine type (none for local runs).
        The decode step sets them before JAX starts (``pipeline._worker_env``)."""
        if self.name != "dataflow" or not self.machine_type:
            return {}
        from dflash_batch.jobs.tpu_env import tpu_env

        return tpu_env(self.machine_type)


@dataclasses.dataclass(frozen=True)
class JobSpec:
    name: str
    input: str
    output: str
    model: ModelSpec = ModelSpec()
    decode: DecodeSpec = dataclasses.field(default_factory=DecodeSpec)  # its checks are defined below
    prompt: PromptSpec = PromptSpec()
    pipeline: PipelineSpec = PipelineSpec()
    runner: RunnerSpec = RunnerSpec()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=False)

    def beam_options(self) -> list[str]:
        """Beam's own flags for this spec's [runner]; ``dflash_batch.pipeline.build`` runs under them."""
        if self.runner.name == "dataflow":
            from dflash_batch.jobs._dataflow import dataflow_flags

            return dataflow_flags(self)
        return [f"--direct_num_workers={self.runner.direct_num_workers}",
                f"--direct_running_mode={self.runner.direct_running_mode}"]

    def require_direct(self) -> "JobSpec":
        """This spec, or SpecError when its runner does not run on this machine."""
        if self.runner.name != "direct":
            raise SpecError([f"runner.name {self.runner.name!r} is not run locally; submit the job to Dataflow "
                             "with `dflash-batch submit`, or use runner.name = 'direct'"])
        return self


# ---- checks: each returns None or "must be ..., got X" -------------------------------------------

def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value) if isinstance(value, (bool, list)) \
        else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else f"must be a non-empty string, got {_show(v)}"


def _positive(v: Any) -> str | None:
    return None if _is_int(v) and v > 0 else f"must be a positive integer, got {_show(v)}"


def _non_negative(v: Any) -> str | None:
    return None if _is_int(v) and v >= 0 else f"must be an integer >= 0, got {_show(v)}"


def _integer(v: Any) -> str | None:
    return None if _is_int(v) and -(2**63) <= v < 2**63 else f"must be an integer (int64), got {_show(v)}"


def _choice(options: Iterable[str]) -> Callable[[Any], str | None]:
    options = tuple(options)
    return lambda v: None if v in options else f"must be one of {'/'.join(options)}, got {_show(v)}"


def _temperature(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf")
    return None if ok else f"must be a number >= 0, got {_show(v)}"


def _top_p(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1
    return None if ok else f"must be a number in (0, 1], got {_show(v)}"


def _job_name(v: Any) -> str | None:
    ok = isinstance(v, str) and _NAME.fullmatch(v)
    return None if ok else ("must be 1-100 letters, digits, '.', '_' or '-' (starting with a letter or digit), "
                            f"got {_show(v)}")


def _location(v: Any) -> str | None:
    if (problem := _text(v)) is not None:
        return problem
    return None if not set("*?[") & set(v) else f"must be a folder or gs:// prefix, not a pattern, got {_show(v)}"


def _optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    return lambda v: None if v is None else check(v)


# section -> key -> check; the section "" holds the top-level keys.
_CHECKS: dict[str, dict[str, Callable[[Any], str | None]]] = {
    "": {"name": _job_name, "input": _text, "output": _location},
    "model": {"target": _text, "drafter": _text, "dtype": _choice(DTYPES), "config": _optional(_text),
              "drafter_config": _optional(_text)},
    "prompt": {"template": _choice(TEMPLATES), "instruction": _text, "truncate": _choice(("none", "left"))},
    "pipeline": {"rows_per_batch": _non_negative, "shards_per_bucket": _non_negative, "rows_per_file": _non_negative,
                 "output_shards": _non_negative},
    "runner": {"name": _choice(RUNNERS), "direct_num_workers": _positive,
               "direct_running_mode": _choice(RUNNING_MODES),
               **{k: _optional(_text) for k in DATAFLOW_STR_KEYS},
               **{k: _optional(_positive) for k in DATAFLOW_INT_KEYS}},
}
# [decode] is checked by DecodeSpec itself (see _decode_problems).
_KEYS = {**{section: tuple(checks) for section, checks in _CHECKS.items()},
         "decode": tuple(f.name for f in dataclasses.fields(DecodeSpec))}
_REQUIRED = ("name", "input", "output")
_REQUIRED_IN = {"prompt": ("template",)}
_SECTION_TYPES = {"model": ModelSpec, "decode": DecodeSpec, "prompt": PromptSpec, "pipeline": PipelineSpec,
                  "runner": RunnerSpec}


def _field(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown(raw: dict[str, Any]) -> list[str]:
    problems = []
    for key, value in raw.items():
        if isinstance(value, dict):
            if key not in _KEYS or key == "":
                problems.append(f"unknown section [{key}]{_suggest(key, [s for s in _KEYS if s])}")
                continue
            for sub in value:
                if sub not in _KEYS[key]:
                    problems.append(f"unknown key {key}.{sub}{_suggest(sub, _KEYS[key])}")
        elif key in _SECTION_TYPES:
            problems.append(f"{key} must be a table ([{key}]), got {_show(value)}")
        elif key not in _CHECKS[""]:
            problems.append(f"unknown key {key}{_suggest(key, list(_CHECKS['']) + list(_SECTION_TYPES))}")
    return problems


def validate(raw: dict[str, Any]) -> JobSpec:
    """The spec in ``raw`` (parsed TOML), or SpecError listing every problem."""
    problems = _unknown(raw)
    for key in _REQUIRED:
        if key not in raw:
            problems.append(f"{key} is required")
    for section, keys in _REQUIRED_IN.items():
        for key in keys:
            if not isinstance(raw.get(section), dict) or key not in raw[section]:
                problems.append(f"{section}.{key} is required (one of {'/'.join(TEMPLATES)})")
    for section, checks in _CHECKS.items():
        table = raw if section == "" else raw.get(section)
        if not isinstance(table, dict):
            continue
        for key, check in checks.items():
            if key in table and (problem := check(table[key])) is not None:
                problems.append(f"{_field(section, key)} {problem}")
    if isinstance(raw.get("decode"), dict):
        problems += _decode_problems(raw["decode"])
    if problems:
        raise SpecError(problems)

    sections = {name: cls(**raw.get(name, {})) for name, cls in _SECTION_TYPES.items()}
    spec = JobSpec(name=raw["name"], input=_local(raw["input"]), output=_local(raw["output"]).rstrip("/"),
                   **sections)
    _cross_checks(spec)
    return spec


def _decode_problems(table: dict[str, Any]) -> list[str]:
    """The [decode] problems, as the decoder's own checks state them (``DecodeSpec.problems``)."""
    try:
        DecodeSpec(**{k: v for k, v in table.items() if k in _KEYS["decode"]})
    except DecodeConfigError as e:
        return [f"decode.{field} {why}" for field, why in e.problems]
    return []


def _local(location: str) -> str:
    return location if "://" in location else os.path.abspath(os.path.expanduser(location))


def _cross_checks(spec: JobSpec) -> None:
    problems = []
    d = spec.decode
    if d.mode in DRAFTER_MODES and spec.model.drafter == "none":
        problems.append(f"model.drafter must name a drafter (default, a folder or gs://) for decode.mode {d.mode!r}, "
                        "got 'none'")
    if d.data_parallel != "auto" and d.batch_size % d.data_parallel:
        problems.append(f"decode.batch_size {d.batch_size} is not divisible by decode.data_parallel "
                        f"{d.data_parallel} (each replica takes an equal share of the batch): use a multiple of "
                        f"{d.data_parallel}")
    if spec.runner.name == "dataflow":
        for key in ("project", "region", "temp_location"):
            if getattr(spec.runner, key) is None:
                problems.append(f"runner.{key} is required for runner.name 'dataflow'")
        for key in ("output", "input"):
            if not getattr(spec, key).startswith("gs://"):
                problems.append(f"{key} must be a gs:// location for runner.name 'dataflow', got "
                                f"{_show(getattr(spec, key))}")
    if problems:
        raise SpecError(problems)


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` (or ``key=value`` for a top-level key) -> (section, key, value).

    The value is read as a TOML value when it is one (``4``, ``0.7``, ``true``, ``[64, 128]``,
    ``"x"``) and as a plain string otherwise (``ar``, ``out/dir``).
    """
    path, sep, value_text = text.partition("=")
    path = path.strip()
    if not sep or not path:
        raise SpecError([f"--set {text!r} must look like section.key=value"])
    section, _, key = path.rpartition(".")
    if "." in section:
        raise SpecError([f"--set {text!r}: {path!r} nests too deep; use section.key"])
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text
    return section, key, value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``section.key=value`` applied (validated later, with the rest)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        if section:
            if not isinstance(out.setdefault(section, {}), dict):
                raise SpecError([f"--set {text!r}: {section} is not a table"])
            out[section][key] = value
        else:
            out[key] = value
    return out


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Reads, overrides and validates a job spec file; SpecError names the file and each field."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError([f"{path} does not exist"], source="job spec") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([f"{path} cannot be read: {e}"], source="job spec") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError([f"not valid TOML: {e}"], source=str(path)) from None
    try:
        return validate(apply_overrides(raw, overrides))
    except SpecError as e:
        raise SpecError(e.problems, source=str(path)) from None
