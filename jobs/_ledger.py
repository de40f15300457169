"""The job ledger: one SQLite row per ``run`` / ``submit``, listed by ``dflash-batch jobs``.

Where: ``$DFLASH_BATCH_LEDGER`` or ``~/.cache/dflash-batch/ledger.sqlite``.

A row records the job id, name, spec JSON and its sha256, runner, start and end (UTC ISO),
status, output location, Dataflow job id, and the pid and host of the process that started it.
Status is ``running`` until the process records an end: ``succeeded`` or ``failed`` for local
runs, ``submitted`` for a Dataflow job (which runs on after the submitting process exits).

A process that dies without recording an end (killed, power loss) would stay ``running``
forever; so a listing reports a ``running`` row whose pid no longer exists on this host as
``failed (process gone)``, and writes that back. Rows from other hosts are left as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import socket
import sqlite3
import uuid
from pathlib import Path
from typing import Any, Iterator

import click

STATUSES = ("running", "succeeded", "failed", "submitted")
GONE = "failed (process gone)"
_COLUMNS = ("job_id", "name", "spec_json", "spec_sha256", "runner", "started_at", "ended_at", "status",
            "output", "dataflow_job_id", "pid", "host", "error")
_SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, name TEXT NOT NULL, spec_json TEXT NOT NULL, spec_sha256 TEXT NOT NULL,
    runner TEXT NOT NULL, started_at TEXT NOT NULL, ended_at TEXT, status TEXT NOT NULL,
    output TEXT, dataflow_job_id TEXT, pid INTEGER, host TEXT, error TEXT)"""


def ledger_path() -> Path:
    return Path(os.environ.get("DFLASH_BATCH_LEDGER") or Path.home() / ".cache" / "dflash-batch" / "ledger.sqlite")


@contextlib.contextmanager
def _connect(path: Path | None = None) -> Iterator[sqlite3.Connection]:
    path = Path(path or ledger_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=30)
    try:
        con.row_factory = sqlite3.Row
        con.execute(_SCHEMA)
        with con:  # one transaction, committed on success
            yield con
    finally:
        con.close()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def record_start(name: str, spec_json: str, runner: str, output: str | None = None,
                 job_id: str | None = None, path: Path | None = None) -> str:
    """Adds a ``running`` row for this process; returns its job id."""
    job_id = job_id or f"{name}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    row = {"job_id": job_id, "name": name, "spec_json": spec_json,
           "spec_sha256": hashlib.sha256(spec_json.encode("utf-8")).hexdigest(), "runner": runner,
           "started_at": _now(), "ended_at": None, "status": "running", "output": output,
           "dataflow_job_id": None, "pid": os.getpid(), "host": socket.gethostname(), "error": None}
    with _connect(path) as con:
        con.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
    return job_id


def update(job_id: str, path: Path | None = None, **fields: Any) -> None:
    """Sets ``fields`` (e.g. ``dataflow_job_id``, ``output``) on a row."""
    unknown = set(fields) - set(_COLUMNS)
    if unknown:
        raise ValueError(f"unknown ledger fields {sorted(unknown)}")
    if fields:
        with _connect(path) as con:
            con.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE job_id = ?",
                        [*fields.values(), job_id])


def record_end(job_id: str, status: str, error: str | None = None, path: Path | None = None, **fields: Any) -> None:
    """Marks a row finished with ``status`` (succeeded / failed / submitted)."""
    if status not in STATUSES[1:]:
        raise ValueError(f"status must be one of {'/'.join(STATUSES[1:])}, got {status!r}")
    update(job_id, path=path, status=status, ended_at=_now(), error=error, **fields)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def list_jobs(path: Path | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Every row, newest first; ``running`` rows of dead processes on this host become ``GONE``."""
    host = socket.gethostname()
    with _connect(path) as con:
        rows = [dict(r) for r in con.execute("SELECT * FROM jobs ORDER BY started_at DESC, rowid DESC")]
        for r in rows:
            if r["status"] == "running" and r["host"] == host and r["pid"] and not _pid_alive(r["pid"]):
                r["status"], r["ended_at"] = GONE, r["ended_at"]
                con.execute("UPDATE jobs SET status = ? WHERE job_id = ? AND status = 'running'", (GONE, r["job_id"]))
    return rows[:limit] if limit else rows


@dataclasses.dataclass
class LedgerEntry:
    """The row a ``ledger_entry`` block writes; ``set`` records fields as they become known."""

    job_id: str
    path: Path | None = None
    end_status: str = "succeeded"

    def set(self, **fields: Any) -> None:
        update(self.job_id, path=self.path, **fields)


@contextlib.contextmanager
def ledger_entry(spec, runner: str, output: str | None = None, wait: bool = True,
                 path: Path | None = None, job_id: str | None = None) -> Iterator[LedgerEntry]:
    """Records the job's start, then its end: ``succeeded`` (``submitted`` when ``wait`` is False,
    i.e. the job runs on elsewhere), or ``failed`` with the error when the block raises.

    ``job_id``: the run's id as its job stats name it (``BuiltJob.job_id``), so that the ledger,
    ``job_stats.json`` and the report show one id for one run."""
    job_id = record_start(spec.name, spec.to_json(), runner, output=output or spec.output, job_id=job_id,
                          path=path)
    entry = LedgerEntry(job_id, path, "succeeded" if wait else "submitted")
    try:
        yield entry
    except BaseException as e:
        record_end(job_id, "failed", error=f"{type(e).__name__}: {e}"[:2000], path=path)
        raise
    record_end(job_id, entry.end_status, path=path)


# ---- the command --------------------------------------------------------------------------------

def format_table(rows: list[dict[str, Any]]) -> str:
    headers = ("job_id", "runner", "status", "started_at", "ended_at", "output", "dataflow_job_id")
    cells = [[str(r.get(h) or "-") for h in headers] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


@click.command("jobs")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as a JSON array (spec included).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Newest N jobs only.")
def jobs_command(as_json: bool, limit: int | None) -> None:
    """List the jobs recorded by `run` and `submit` (newest first)."""
    rows = list_jobs(limit=limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo(f"no jobs recorded in {ledger_path()}")
    else:
        click.echo(format_table(rows))
