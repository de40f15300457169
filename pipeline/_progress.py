"""Live progress of a local run, for the command line's progress bar.

Beam's metrics are only readable once a DirectRunner job has finished, so a local run also
appends small JSON lines to a folder on this machine: one file per worker process (no locking
between processes), one line per decoded batch or per bundle of dead letters. The launcher sums
them while the job runs. Nothing is written when no folder is given (e.g. on Dataflow).
"""

from __future__ import annotations

import collections
import json
import os
import threading
from pathlib import Path

FIELDS = ("rows", "completion_tokens", "steps", "committed", "dead_letters", "skipped")


class ProgressLog:
    """Appends counts to ``<folder>/<pid>.jsonl``; a no-op without a folder."""

    _lock = threading.Lock()

    def __init__(self, folder: str | None):
        self.folder = folder

    def report(self, **counts: int) -> None:
        if not self.folder:
            return
        line = json.dumps({k: int(v) for k, v in counts.items()}) + "\n"
        path = Path(self.folder) / f"{os.getpid()}.jsonl"
        try:
            with self._lock, open(path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError:  # progress is a convenience; it must never fail a bundle
            pass


def read_progress(folder: str | Path) -> dict[str, int]:
    """The sums of every count reported so far (a partly written last line is ignored)."""
    totals: collections.Counter[str] = collections.Counter({k: 0 for k in FIELDS})
    for path in Path(folder).glob("*.jsonl"):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        for line in text.splitlines():
            try:
                totals.update(json.loads(line))
            except ValueError:
                continue
    return dict(totals)
