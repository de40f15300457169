"""How a ``Decoder`` decodes: one frozen config, its defaults and its checks in one place.

The job spec's ``[decode]`` section is this config plus the per-row sampling defaults, so a
setting's default and its check live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


MODES = ("ar", "dflash", "ngram", "hybrid")  # "ar" decodes alone; the others name a proposer
DEFAULT_PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, bool) else repr(v)  # true, as a job spec writes it
    return text if len(text) <= 60 else text[:57] + "..."


class DecodeConfigError(ValueError):
    """A config that cannot work; ``problems`` holds (field, what is wrong) for each setting."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("; ".join(f"{field} {why}" for field, why in self.problems))


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """mode: ar | dflash | ngram | hybrid. block_size: the verified block length (drafts per
    step + 1) of the speculative modes, or "auto" (chosen per batch from measured costs).
    batch_size: slots of each static batch. max_new_tokens: the completion capacity of a slot.
    prompt_buckets: the static prompt lengths a batch is compiled for. prefill_chunk: tokens
    per prefill pass. chunk_steps: decode steps between the host's looks at the batch.
    data_parallel, tensor_parallel: the ('data', 'model') mesh over this worker's chips, each
    "auto" (the smallest tensor parallel that fits, the other chips data parallel) or a
    positive integer; batch_size is the worker's global batch."""

    mode: str = "ar"
    block_size: int | str = "auto"
    batch_size: int = 8
    data_parallel: int | str = "auto"
    tensor_parallel: int | str = "auto"
    max_new_tokens: int = 256
    prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS
    prefill_chunk: int = 64
    # The host sees the batch this often when no row finishes sooner: a round trip costs about a
    # millisecond, a step tens of milliseconds on a CPU.
    chunk_steps: int = 16

    def __post_init__(self):
        if isinstance(self.prompt_buckets, list):
            object.__setattr__(self, "prompt_buckets", tuple(self.prompt_buckets))
        if problems := self.problems():
            raise DecodeConfigError(problems)

    def problems(self) -> list[tuple[str, str]]:
        """(field, what is wrong) for every setting that cannot work."""
        out = []
        if not (isinstance(self.mode, str) and self.mode in MODES):
            out.append(("mode", f"must be one of {'/'.join(MODES)}, got {_show(self.mode)}"))
        if not (self.block_size == "auto" or (_int(self.block_size) and self.block_size > 0)):
            out.append(("block_size", f"must be 'auto' or a positive integer, got {_show(self.block_size)}"))
        for name in ("data_parallel", "tensor_parallel"):
            v = getattr(self, name)
            if not (v == "auto" or (_int(v) and v > 0)):
                out.append((name, f"must be 'auto' or a positive integer, got {_show(v)}"))
        for name in ("batch_size", "max_new_tokens", "prefill_chunk", "chunk_steps"):
            v = getattr(self, name)
            if not (_int(v) and v > 0):
                out.append((name, f"must be a positive integer, got {_show(v)}"))
        b = self.prompt_buckets
        if not (isinstance(b, tuple) and b and all(_int(x) and x > 0 for x in b)
                and all(x < y for x, y in zip(b, b[1:]))):
            out.append(("prompt_buckets", "must be a non-empty list of increasing positive integers, got "
                        f"{_show(list(b) if isinstance(b, tuple) else b)}"))
        return out

    def replace(self, **changes) -> "DecodeConfig":
        return dataclasses.replace(self, **changes)
