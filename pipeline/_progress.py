"""Live progress of a local run, for the command line's progress bar.

Beam's metrics are only readable once a DirectRunner job has finished, so a local run also
appends small JSON lines to a folder on this machine: one file per worker process (no locking
between processes). A line is either counts (a decoded row, a bundle of dead letters or of
skipped ids) or a phase the process entered: ``loading`` the model, ``compiling`` a bucket, or
``decoding`` a bucket; each carries its time. The launcher reads them while the job runs.
Nothing is written when no folder is given (e.g. on Dataflow).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import threading
import time
from pathlib import Path

FIELDS = ("rows", "completion_tokens", "steps", "committed", "dead_letters", "skipped")
PHASES = ("loading", "compiling", "decoding")
RATE_WINDOW_S = 30.0  # long enough to span several rows finishing in a static batch


class ProgressLog:
    """Appends to ``<folder>/<pid>.jsonl``; a no-op without a folder."""

    _lock = threading.Lock()

    def __init__(self, folder: str | None):
        self.folder = folder
        self._phase: tuple[str, int | None] | None = None

    def report(self, **counts: int) -> None:
        self._write({"t": time.time(), **{k: int(v) for k, v in counts.items()}})

    def phase(self, phase: str, bucket: int | None = None) -> None:
        """This process now does ``phase`` (one of PHASES), for ``bucket`` where there is one.
        Repeating the phase last written (the next batch of the same bucket) writes nothing."""
        if (phase, bucket) == self._phase:
            return
        self._phase = (phase, bucket)
        self._write({"t": time.time(), "phase": phase, "bucket": bucket})

    def _write(self, record: dict) -> None:
        if not self.folder:
            return
        path = Path(self.folder) / f"{os.getpid()}.jsonl"
        try:
            with self._lock, open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError:  # progress is a convenience; it must never fail a bundle
            pass


@dataclasses.dataclass
class Progress:
    """What the workers reported so far."""

    totals: dict[str, int]
    phases: dict[str, tuple[str, int | None]]  # per worker process: its latest phase and bucket
    tokens: list[tuple[float, int]]  # (time, completion tokens) of each decoded row, in time order
    decode_starts: list[float]  # when a process began decoding a bucket

    def __getitem__(self, key: str) -> int:
        return self.totals[key]

    def phase_text(self) -> str:
        """'loading model', 'compiling bucket 384', 'decoding', or 'starting' before any of them."""
        now = collections.defaultdict(set)
        for phase, bucket in self.phases.values():
            now[phase].add(bucket)
        if "loading" in now:
            return "loading model"
        if "compiling" in now:
            buckets = sorted(b for b in now["compiling"] if b is not None)
            return f"compiling bucket{'s' if len(buckets) > 1 else ''} {', '.join(map(str, buckets))}"
        if "decoding" in now:
            return "decoding"
        return "starting"

    def moving_rate(self, window: float = RATE_WINDOW_S) -> float | None:
        """Completion tokens/s over the last ``window`` seconds of reports, ending at the latest.

        Tokens are counted as rows finish (the decoder hands a row over when it is done). The
        rate holds still between reports (it is not tokens over the time since the start), and
        it starts from the latest start of decoding, so loading and compiling never count.
        """
        if not self.tokens:
            return None
        t_end = self.tokens[-1][0]
        anchors = [t for t in self.decode_starts if t <= t_end]
        anchors += [t for t, _ in self.tokens if t <= t_end - window]
        start = max(anchors, default=self.tokens[0][0])
        n = sum(k for t, k in self.tokens if start < t <= t_end)
        return n / (t_end - start) if t_end > start else None

    @property
    def tau(self) -> float | None:
        return self.totals["committed"] / self.totals["steps"] if self.totals["steps"] else None


def read_progress(folder: str | Path) -> Progress:
    """Everything reported so far (a partly written last line is ignored)."""
    totals: collections.Counter[str] = collections.Counter({k: 0 for k in FIELDS})
    phases: dict[str, tuple[str, int | None]] = {}
    tokens: list[tuple[float, int]] = []
    starts: list[float] = []
    for path in Path(folder).glob("*.jsonl"):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            t = record.pop("t", 0.0)
            if "phase" in record:
                phases[path.stem] = (record["phase"], record.get("bucket"))
                if record["phase"] == "decoding":
                    starts.append(t)
                continue
            totals.update(record)
            if record.get("completion_tokens"):
                tokens.append((t, record["completion_tokens"]))
    return Progress(dict(totals), phases, sorted(tokens), sorted(starts))
