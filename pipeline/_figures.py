"""The time and throughput figures of a job, each defined once.

Every figure a user reads about a job (``run``'s summary, ``job_stats.json``, ``audit`` and its
HTML report) is a ``Figures`` built here, so they cannot disagree:

- wall seconds: from the run's start (its pipeline built) to its job stats written;
- load seconds: loading the model in the decode step (once per worker process);
- compile seconds: the decoder's warmup per bucket (XLA compilation, and the block lengths'
  step costs measured when the block length is chosen automatically);
- decode seconds: the decoder's time on batches once compiled, summed over decoder calls. It
  holds the prompts' prefill as well as the decode steps: the decoder refills a finished row's
  slot with the next prompt between decode steps, and does not time the two apart. A worker
  process decodes one batch at a time, so with one process (the default, and the rule on TPU)
  wall seconds are at least decode seconds;
- tokens/s: completion tokens over wall seconds (the job as a user waits for it), and over
  decode seconds ("while decoding", the decoder at work).

A rerun into the same output (a resume) is a run of its own. A job's figures are the sums of its
runs' figures, and each rate divides the tokens of the runs it sums by the seconds of those same
runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

_SECONDS = ("wall_seconds", "load_seconds", "compile_seconds", "decode_seconds")
_COUNTS = ("rows", "prompt_tokens", "completion_tokens", "model_loads")


@dataclasses.dataclass(frozen=True)
class Figures:
    """Seconds and tokens of a run, of a bucket within a run, or summed over runs."""

    wall_seconds: float = 0.0
    load_seconds: float = 0.0
    compile_seconds: float = 0.0
    decode_seconds: float = 0.0
    rows: int = 0  # completions decoded
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model_loads: int = 0

    def __post_init__(self):
        for name in _SECONDS:  # stored as recorded, so figures read back from JSON compare equal
            object.__setattr__(self, name, round(float(getattr(self, name)), 3))

    @property
    def tokens_per_s(self) -> float | None:
        """Completion tokens over wall seconds."""
        return round(self.completion_tokens / self.wall_seconds, 3) if self.wall_seconds > 0 else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Completion tokens over decode seconds."""
        return round(self.completion_tokens / self.decode_seconds, 3) if self.decode_seconds > 0 else None

    def __add__(self, other: Figures) -> Figures:
        return Figures(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                          for f in dataclasses.fields(self)})

    def as_dict(self) -> dict[str, Any]:
        """The figures with both rates, as they are written to JSON."""
        return {**dataclasses.asdict(self), "tokens_per_s": self.tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Figures:
        """The figures in a record written by ``as_dict`` (missing ones are 0; rates are recomputed)."""
        return cls(**{name: record.get(name) or 0 for name in (*_SECONDS, *_COUNTS)})


def total(figures: Iterable[Figures]) -> Figures:
    return sum(figures, Figures())


def format_seconds(s: float | None) -> str:
    """Seconds as a user reads them: '12.54 s', or minutes past two."""
    if s is None:
        return "-"
    return f"{s:.2f} s" if s < 120 else f"{s / 60:.1f} min"


def format_rate(r: float | None) -> str:
    return "-" if r is None else f"{r:.1f}"


def time_line(f: Figures) -> str:
    """'wall 12.30 s, model load 1.20 s, compile 4.50 s, decode 6.10 s' (the same words everywhere)."""
    return (f"wall {format_seconds(f.wall_seconds)}, model load {format_seconds(f.load_seconds)}, "
            f"compile {format_seconds(f.compile_seconds)}, decode {format_seconds(f.decode_seconds)}")


def rate_line(f: Figures) -> str:
    """Completion tokens/s: '10.2 over wall time, 84.4 while decoding (1234 completion tokens)'."""
    return (f"{format_rate(f.tokens_per_s)} over wall time, {format_rate(f.decode_tokens_per_s)} while decoding "
            f"({f.completion_tokens} completion tokens)")
