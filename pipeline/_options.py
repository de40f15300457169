"""The pipeline's settings: Beam command-line flags and the frozen ``JobConfig`` built from them.

The pipeline speaks Beam's own language (``--input gs://... --batch_size 8 --runner ...``), so it
can be launched as ``python -m dflash_batch.pipeline`` or from a Dataflow template as well as from
a job spec. ``jobs/_spec.py`` owns the user-facing TOML spec and its thorough validation; it
turns a valid spec into these flags. The checks here are the safety net for direct callers.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from dflash_batch.decoder import DEFAULT_PROMPT_BUCKETS, DRAFTER_MODES, MODES, ROWS_PER_SLOT
from dflash_batch.pipeline._templates import SUMMARIZE_INSTRUCTION, TEMPLATES


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in str(text).split(",") if v.strip())


def _block_size(text: str) -> int | str:
    """``auto`` or a positive integer (argparse reports anything else against ``--block_size``)."""
    if str(text) == "auto":
        return "auto"
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


class JobOptions(PipelineOptions):
    """The flags of a dflash-batch job (Beam's own flags such as ``--runner`` stay Beam's)."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument("--input", help="Parquet prompt files: a path, glob or gs:// pattern.")
        parser.add_argument("--output", help="Output folder or gs:// prefix.")
        parser.add_argument("--model", help="Target model: registered name, folder or gs:// prefix.")
        parser.add_argument("--drafter", default=None, help="Drafter folder or gs:// prefix (mode dflash).")
        parser.add_argument("--decode_mode", default="ar", choices=MODES)
        parser.add_argument("--block_size", type=_block_size, default="auto",
                            help="Verified block length of dflash/ngram, or 'auto' (chosen from measured costs).")
        parser.add_argument("--batch_size", type=int, default=8, help="Decoder slots per static batch.")
        parser.add_argument("--data_parallel", type=_block_size, default="auto",
                            help="Data-parallel degree over the worker's chips, or 'auto'.")
        parser.add_argument("--tensor_parallel", type=_block_size, default="auto",
                            help="Tensor-parallel degree, or 'auto' (the smallest that fits memory).")
        parser.add_argument("--max_new_tokens", type=int, default=256)
        parser.add_argument("--temperature", type=float, default=0.0, help="Default for rows without one.")
        parser.add_argument("--top_p", type=float, default=1.0, help="Default for rows without one.")
        parser.add_argument("--seed", type=int, default=0, help="Job seed; rows without a seed derive theirs.")
        parser.add_argument("--prompt_template", default="none", choices=TEMPLATES)
        parser.add_argument("--prompt_instruction", default=SUMMARIZE_INSTRUCTION)
        parser.add_argument("--prompt_buckets", default=",".join(map(str, DEFAULT_PROMPT_BUCKETS)),
                            help="Comma-separated padded prompt lengths.")
        parser.add_argument("--rows_per_batch", type=int, default=0,
                            help="Rows handed to the decoder at once (0: 4 x batch_size).")
        parser.add_argument("--shards_per_bucket", type=int, default=0,
                            help="Keys per length bucket, i.e. decode parallelism (0: number of workers).")
        parser.add_argument("--output_shards", type=int, default=0, help="Completion files (0: runner decides).")
        parser.add_argument("--spec_name", default="job", help="The job's name, for records.")
        parser.add_argument("--spec_json", default="{}", help="The job spec as run, for records.")
        parser.add_argument("--progress_dir", default=None, help="Local folder for live progress (local runs).")


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Everything the pipeline's steps need, validated; pickled into the DoFns."""

    input: str
    output: str
    model: str
    drafter: str | None
    mode: str
    block_size: int | str  # or "auto"
    batch_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    template: str
    instruction: str
    prompt_buckets: tuple[int, ...]
    rows_per_batch: int
    shards_per_bucket: int
    output_shards: int
    name: str = "job"
    spec_json: str = "{}"
    progress_dir: str | None = None
    data_parallel: int | str = "auto"
    tensor_parallel: int | str = "auto"

    def __post_init__(self):
        problems = []
        for flag in ("input", "output", "model"):
            if not getattr(self, flag):
                problems.append(f"--{flag} is required")
        if self.mode not in MODES:
            problems.append(f"--decode_mode must be one of {'/'.join(MODES)}, got {self.mode!r}")
        if self.mode in DRAFTER_MODES and not self.drafter:
            problems.append(f"--decode_mode {self.mode} needs --drafter")
        if self.block_size != "auto" and not (isinstance(self.block_size, int) and self.block_size >= 1):
            problems.append(f"--block_size must be 'auto' or >= 1, got {self.block_size!r}")
        for flag in ("batch_size", "max_new_tokens", "rows_per_batch", "shards_per_bucket"):
            if getattr(self, flag) < 1:
                problems.append(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        for flag in ("data_parallel", "tensor_parallel"):
            v = getattr(self, flag)
            if v != "auto" and not (isinstance(v, int) and v >= 1):
                problems.append(f"--{flag} must be 'auto' or >= 1, got {v!r}")
        if self.output_shards < 0:
            problems.append(f"--output_shards must be >= 0, got {self.output_shards}")
        if not 0 < self.top_p <= 1 or self.temperature < 0:
            problems.append(f"need --temperature >= 0 and 0 < --top_p <= 1, got {self.temperature}, {self.top_p}")
        if not self.prompt_buckets or list(self.prompt_buckets) != sorted(set(self.prompt_buckets)) \
                or self.prompt_buckets[0] < 1:
            problems.append(f"--prompt_buckets must be increasing positive integers, got {self.prompt_buckets}")
        if self.template not in TEMPLATES:
            problems.append(f"--prompt_template must be one of {'/'.join(TEMPLATES)}, got {self.template!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def largest_bucket(self) -> int:
        return self.prompt_buckets[-1]

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if k != "spec_json"})

    @classmethod
    def from_options(cls, options: PipelineOptions) -> "JobConfig":
        o = options.view_as(JobOptions)
        batch_size = o.batch_size
        workers = _worker_count(options)
        return cls(
            input=o.input or "", output=(o.output or "").rstrip("/"), model=o.model or "",
            drafter=o.drafter if o.decode_mode in DRAFTER_MODES else None, mode=o.decode_mode,
            block_size=o.block_size, batch_size=batch_size, max_new_tokens=o.max_new_tokens,
            temperature=o.temperature, top_p=o.top_p, seed=o.seed, template=o.prompt_template,
            instruction=o.prompt_instruction, prompt_buckets=_int_list(o.prompt_buckets),
            rows_per_batch=o.rows_per_batch or ROWS_PER_SLOT * batch_size,
            shards_per_bucket=o.shards_per_bucket or workers,
            output_shards=o.output_shards, name=o.spec_name, spec_json=o.spec_json, progress_dir=o.progress_dir,
            data_parallel=o.data_parallel, tensor_parallel=o.tensor_parallel,
        )


def _worker_count(options: PipelineOptions) -> int:
    """How many processes may decode at once: one key per bucket for each of them."""
    all_options = options.get_all_options(retain_unknown_options=True)
    if all_options.get("runner") in (None, "DirectRunner", "direct", "FnApiRunner"):
        return max(1, int(all_options.get("direct_num_workers") or 1))
    return max(1, int(all_options.get("max_num_workers") or all_options.get("num_workers") or 1))


def parse_options(argv: Sequence[str] | PipelineOptions) -> PipelineOptions:
    """``argv`` as PipelineOptions. An explicit list: never falls back to ``sys.argv``."""
    if isinstance(argv, PipelineOptions):
        return argv
    return PipelineOptions(list(argv))
