"""The job ledger: rows round-trip, and a crashed run shows as failed, not running forever."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dflash_batch.jobs import _ledger
from dflash_batch.jobs.cli import main


@pytest.fixture(autouse=True)
def ledger(tmp_path, monkeypatch):
    path = tmp_path / "ledger.sqlite"
    monkeypatch.setenv("DFLASH_BATCH_LEDGER", str(path))
    return path


class Spec:
    name = "ledger-test"
    output = "/tmp/out"

    def to_json(self):
        return json.dumps({"name": self.name})


def test_entries_round_trip():
    job_id = _ledger.record_start("j", '{"a": 1}', "dataflow", output="gs://b/o")
    _ledger.record_end(job_id, "submitted", dataflow_job_id="2026-01-01_df")
    [row] = _ledger.list_jobs()
    assert row["job_id"] == job_id and row["status"] == "submitted" and row["dataflow_job_id"] == "2026-01-01_df"
    assert row["spec_json"] == '{"a": 1}' and row["output"] == "gs://b/o" and row["ended_at"]
    import hashlib
    assert row["spec_sha256"] == hashlib.sha256(b'{"a": 1}').hexdigest()


def test_ledger_entry_records_failure_on_exception_and_success_otherwise():
    with pytest.raises(RuntimeError):
        with _ledger.ledger_entry(Spec(), runner="direct"):
            raise RuntimeError("boom")
    with _ledger.ledger_entry(Spec(), runner="direct"):
        pass
    statuses = sorted((r["status"], r["error"]) for r in _ledger.list_jobs())
    assert statuses == [("failed", "RuntimeError: boom"), ("succeeded", None)]


def test_a_killed_run_shows_as_failed(ledger):
    code = ("import time; from dflash_batch.jobs import _ledger; "
            "print(_ledger.record_start('crash', '{}', 'direct'), flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    job_id = proc.stdout.readline().strip()
    assert [r["status"] for r in _ledger.list_jobs()] == ["running"]  # alive: still running
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [row] = _ledger.list_jobs()
    assert row["job_id"] == job_id and row["status"] == _ledger.GONE
    result = CliRunner().invoke(main, ["jobs", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)[0]["status"] == "failed (process gone)"
    table = CliRunner().invoke(main, ["jobs"]).output
    assert job_id in table and "failed (process gone)" in table
