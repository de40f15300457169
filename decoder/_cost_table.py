"""Measured decode-step costs, kept beside the persistent compilation cache.

An automatic block length needs each candidate's cost per step at the job's batch size
(``_autoblock``). Measuring them takes longer than loading the compiled programs from the
persistent cache, so a rerun of the same job on the same machine would spend most of its
start-up timing steps it timed before. The measurements are therefore stored under a key that
names everything that shapes a step's cost: the hardware, the compiled programs' static
shapes and settings, and the decoder's own source. Anything else gets new measurements.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dflash_batch.decoder._compile_cache import enabled_cache_dir

FOLDER = "dflash-block-costs"  # inside the compilation cache folder
# The code that decides what a decode step computes; a change to it is a new program.
_SOURCES = ("decoder", "kernels")


def cost_key(*parts) -> str:
    """A key for the measurements of programs described by ``parts`` (their ``repr``s)."""
    h = hashlib.sha256(repr(parts).encode())
    root = Path(__file__).resolve().parent.parent
    for folder in _SOURCES:
        for path in sorted((root / folder).glob("*.py")):
            h.update(path.read_bytes())
    return h.hexdigest()[:32]


def _path(key: str) -> Path | None:
    folder = enabled_cache_dir()
    return folder / FOLDER / f"{key}.json" if folder is not None else None


def load_costs(key: str) -> tuple[dict[int, list[float]], dict[int, list[float]]] | None:
    """The per-round step seconds stored for ``key`` (plain, gated), or None."""
    path = _path(key)
    if path is None or not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        return ({int(b): list(t) for b, t in raw["per_step"].items()},
                {int(b): list(t) for b, t in raw["gated"].items()})
    except (ValueError, KeyError, TypeError):  # a torn or foreign file: measure again
        return None


def save_costs(key: str, per_step: dict[int, list[float]], gated: dict[int, list[float]],
               seconds: float | None = None) -> None:
    """Stores the measurements (written to a temporary name and renamed: never half a file);
    ``seconds``: what compiling and timing these lengths took when they were measured."""
    path = _path(key)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"per_step": {str(b): t for b, t in per_step.items()},
                               "gated": {str(b): t for b, t in gated.items()}, "seconds": seconds}))
    tmp.replace(path)


def stored_seconds(key: str) -> float | None:
    """The ``seconds`` stored with ``key``'s measurements, or None."""
    path = _path(key)
    try:
        return float(json.loads(path.read_text())["seconds"]) if path is not None and path.is_file() else None
    except (ValueError, KeyError, TypeError):
        return None
