"""gs:// in and out, end to end, against a real HTTP GCS emulator (no mocks, no credentials)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from gcs_emulator import DEFAULT_BUCKET, start_gcs_emulator
from job_helpers import job_spec, sentence

from dflash_batch.pipeline import build

pytestmark = pytest.mark.slow


@pytest.fixture
def gcs(monkeypatch):
    """The emulator's URL, with the environment pointing at it. Any credential lookup (which Beam
    retries for ~20 s when there are no credentials) is recorded and fails the test."""
    import google.auth
    from apache_beam.internal.gcp import auth

    lookups = []

    def no_lookup(*_a, **_k):
        lookups.append(1)
        raise google.auth.exceptions.DefaultCredentialsError("no credentials in tests")

    saved = (auth._Credentials._credentials_init, auth._Credentials._credentials)
    auth._Credentials._credentials_init = False  # as in a fresh process
    with start_gcs_emulator() as host:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", host)
        monkeypatch.setattr(google.auth, "default", no_lookup)
        yield host
    auth._Credentials._credentials_init, auth._Credentials._credentials = saved
    assert not lookups, "Beam looked for credentials instead of connecting to the emulator anonymously"


def _bucket():
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(credentials=AnonymousCredentials(), project="test").bucket(DEFAULT_BUCKET)


def _upload_parquet(name: str, rows: list[dict]) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    _bucket().blob(name).upload_from_string(buf.getvalue())


def _read_parquet(names: list[str]) -> list[dict]:
    return [r for n in names for r in pq.read_table(io.BytesIO(_bucket().blob(n).download_as_bytes())).to_pylist()]


def test_job_reads_and_writes_gs_through_the_emulator(gcs, chat_model_dir):
    _upload_parquet("prompts/part-0.parquet", [{"id": f"a{i}", "prompt": sentence(i), "k": i} for i in range(4)])
    _upload_parquet("prompts/part-1.parquet", [{"id": "b0", "prompt": sentence(9), "k": 9}, {"id": "b1", "prompt": ""}])

    result = build(job_spec(chat_model_dir, f"gs://{DEFAULT_BUCKET}/prompts/*.parquet",
                            f"gs://{DEFAULT_BUCKET}/jobs/run1")).run()

    names = sorted(b.name for b in _bucket().list_blobs(prefix="jobs/run1/"))
    done = _read_parquet([n for n in names if n.startswith("jobs/run1/completions-")])
    dead = _read_parquet([n for n in names if n.startswith("jobs/run1/dead_letters-")])
    stats = json.loads(_bucket().blob("jobs/run1/job_stats.json").download_as_bytes())
    assert sorted(r["id"] for r in done) == ["a0", "a1", "a2", "a3", "b0"]
    assert {r["id"]: r["k"] for r in done}["b0"] == 9  # carried column
    assert [(d["id"], d["error"]) for d in dead] == [("b1", "prompt is empty")]
    assert dead[0]["source"] == f"gs://{DEFAULT_BUCKET}/prompts/part-1.parquet"
    assert stats["rows_in"] == 6 == stats["completions_out"] + stats["dead_letters"]
    assert stats["files"]["completions"][0].startswith(f"gs://{DEFAULT_BUCKET}/jobs/run1/completions-")
    assert result.stats == stats
    assert not [n for n in names if "beam-temp" in n]  # Beam cleaned its temporary files

    # A rerun through gs:// skips everything already there.
    again = build(job_spec(chat_model_dir, f"gs://{DEFAULT_BUCKET}/prompts/*.parquet",
                           f"gs://{DEFAULT_BUCKET}/jobs/run1")).run()
    assert again.stats["skipped_completed"] == 5 and again.stats["completions_this_run"] == 0
