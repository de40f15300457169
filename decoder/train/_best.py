"""The best evaluated drafter of a run, kept on disk across resumed calls.

A small data set is memorised late in a long run, so the last step is not always the best
drafter; the run exports the one with the highest held-out decoder tau instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp

from dflash_batch.decoder._drafter_checkpoint import load_drafter, save_drafter
from dflash_batch.decoder._drafter_config import DrafterConfig
from dflash_batch.decoder._target import Params


class BestDrafter:
    """The evaluated drafter with the highest held-out decoder tau so far, kept in ``folder``
    (fp32) across resumed calls of one run; another run's (other ``run_id``) is ignored."""

    def __init__(self, folder: Path, run_id: str):
        self.folder, self.run_id = Path(folder), run_id
        self.record = self.folder / "best.json"

    def _current(self) -> dict | None:
        if not self.record.exists():
            return None
        rec = json.loads(self.record.read_text())
        return rec if rec.get("run") == self.run_id else None

    def offer(self, step: int, tau: float, dcfg: DrafterConfig, params: Params) -> bool:
        """Keeps ``params`` if their ``tau`` beats the best so far (ties go to the later step)."""
        cur = self._current()
        if cur is not None and tau < cur["decoder_tau"]:
            return False
        self.record.unlink(missing_ok=True)  # never a record that points at half-written weights
        save_drafter(self.folder, dcfg, params, dtype=jnp.float32)
        self.record.write_text(json.dumps({"run": self.run_id, "step": step, "decoder_tau": tau}))
        return True

    def load(self) -> tuple[int, Params] | None:
        cur = self._current()
        if cur is None:
            return None
        return cur["step"], load_drafter(self.folder).params
