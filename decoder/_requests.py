"""What the decoder takes and gives back, independent of the decode mode."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dflash_batch.schemas import tau_from_histogram


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt, already tokenized. ``temperature`` 0 means greedy."""

    id: str
    token_ids: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if len(self.token_ids) == 0:
            raise ValueError(f"request {self.id!r} has no prompt tokens")
        if self.max_new_tokens < 1:
            raise ValueError(f"request {self.id!r}: {self.max_new_tokens=} must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"request {self.id!r}: bad {self.temperature=} or {self.top_p=}")


@dataclasses.dataclass
class Result:
    """One finished request with its per-request acceptance statistics.

    ``decode_steps`` counts target passes after prefill; ``accepted_per_step[i]``
    is how many of those steps committed i+1 tokens (accepted drafts plus the
    target's own bonus token, as the DFlash paper counts tau).
    """

    id: str
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str  # 'stop' | 'length' | 'eos'
    decode_steps: int
    accepted_per_step: np.ndarray
    draft_tokens_proposed: int
    draft_tokens_accepted: int
    decode_seconds: float
    bucket: int = 0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tau(self) -> float:
        """Mean tokens committed per decode step (the prefill's first token excluded)."""
        return float(tau_from_histogram(self.accepted_per_step, empty=1.0))
