"""The accepted-per-step histogram of the completions contract, and tau read from it.

Index i of a histogram counts the decode steps that committed i + 1 tokens: the accepted draft
tokens plus the target's bonus token. tau counts that bonus, as the DFlash paper does, so a
step that accepts nothing still commits 1 and tau is never below 1.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def committed_tokens(hist: Sequence[int] | np.ndarray) -> int:
    """Tokens committed over all the steps of ``hist`` (sum of (i + 1) x steps at index i)."""
    h = np.asarray(hist, np.int64)
    return int((h * np.arange(1, len(h) + 1)).sum())


def tau_from_histogram(hist: Sequence[int] | np.ndarray, *, empty: float | None = None) -> float | None:
    """tau, the mean tokens committed per decode step, bonus included; ``empty`` when no step ran.

    Callers differ on a request with no step: a decoder result reads 1.0 (one token, no speedup),
    a report reads None (nothing to say), so the empty case is the caller's to name.
    """
    steps = int(np.asarray(hist, np.int64).sum())
    return committed_tokens(hist) / steps if steps else empty


def add_histograms(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> list[int]:
    """The step counts of two histograms added; the shorter one counts zero past its end."""
    n = max(len(a), len(b))
    padded = [np.pad(np.asarray(h, np.int64), (0, n - len(h))) for h in (a, b)]
    return (padded[0] + padded[1]).tolist()


def observed_range(hist: Sequence[int]) -> list[int]:
    """The histogram up to its last step size that occurred (index i: steps committing i + 1 tokens)."""
    counts = list(hist)
    nonzero = [i for i, n in enumerate(counts) if n]
    return counts[: nonzero[-1] + 1] if nonzero else []
