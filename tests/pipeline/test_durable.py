"""Durable progress: parts saved as the job goes, runs killed midway, chunked runs, retried bundles."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from job_helpers import DECODE, completions, dead_letters, job_spec, job_stats, sentence, write_prompts

from dflash_batch.pipeline import build, read_outcomes
from dflash_batch.pipeline._parts import PARTIAL, WriteParts, part_name, write_part
from dflash_batch.schemas import DEAD_LETTERS_SCHEMA, dead_letter_key, dead_letter_row

REPO = Path(__file__).resolve().parents[2]


def _ids(folder: Path, prefix: str = "completions-") -> list[str]:
    return [i for p in sorted(folder.glob(f"{prefix}*.parquet")) for i in pq.read_table(p).column("id").to_pylist()]


def test_a_part_is_named_by_its_rows_and_a_retry_rewrites_it(tmp_path):
    rows = [dead_letter_row({"id": f"d{i}"}, "invalid_row", f"bad {i}", "f") for i in range(5)]
    keys = [dead_letter_key(r) for r in rows]
    first = write_part(str(tmp_path), "dead_letters-", DEAD_LETTERS_SCHEMA, rows, keys)
    again = write_part(str(tmp_path), "dead_letters-", DEAD_LETTERS_SCHEMA, rows[::-1], keys[::-1])  # a retry
    assert first == again == str(tmp_path / part_name("dead_letters-", keys))
    assert [p.name for p in tmp_path.iterdir()] == [Path(first).name]  # no copy and no temporary left
    other = write_part(str(tmp_path), "dead_letters-", DEAD_LETTERS_SCHEMA, rows[:4], keys[:4])
    assert other != first


def test_rows_cut_into_parts_the_same_way_every_time(tmp_path):
    rows = [dead_letter_row({"id": f"d{i}"}, "invalid_row", "bad", "f") for i in range(7)]
    fn = WriteParts(str(tmp_path), "dead_letters-", DEAD_LETTERS_SCHEMA, dead_letter_key, rows_per_file=3)
    fn.setup()
    first = list(fn.process((0, rows)))
    second = list(fn.process((0, rows[::-1])))  # the same rows, arriving in another order
    assert first == second and len(first) == 3  # 3 + 3 + 1 rows
    assert sorted(_ids(tmp_path, "dead_letters-")) == sorted(r["id"] for r in rows)


def _job_file(tmp_path: Path, model: Path, inputs: Path, out: Path, new_tokens: int = DECODE['max_new_tokens'],
              **pipeline) -> Path:
    settings = "\n".join(f"{k} = {v}" for k, v in pipeline.items())
    path = tmp_path / "job.toml"
    path.write_text(f"""
name = "durable"
input = "{inputs}"
output = "{out}"
[model]
target = "{model}"
[decode]
mode = "ar"
batch_size = {DECODE['batch_size']}
max_new_tokens = {new_tokens}
prompt_buckets = {DECODE['prompt_buckets']}
[prompt]
template = "none"
[pipeline]
{settings}
""")
    return path


def _as_in_a_terminal() -> None:
    """In the job's process before it starts: Ctrl-C's signal handled by default and not blocked, as
    in a terminal. A process inherits an ignored or blocked SIGINT from the one that starts it, and
    a test worker may have either from an earlier test (measured: a signalled run then ended 0)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def _run_until(job: Path, out: Path, saved: int, sig: int, timeout: float = 600.0) -> subprocess.CompletedProcess:
    """Runs ``dflash-batch run JOB`` in a new process and sends it ``sig`` once ``saved`` completions
    are on disk. The result's ``signalled`` says when it was sent (ids on disk, seconds after the
    start), or None when the run ended first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    cmd = [sys.executable, "-P", "-c", "from dflash_batch.jobs.cli import main; main()", "run", str(job),
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            preexec_fn=_as_in_a_terminal)
    start = time.monotonic()
    signalled = None
    try:
        while time.monotonic() < start + timeout and proc.poll() is None:
            time.sleep(0.2)
            try:
                n = len(_ids(out))
            except (OSError, pa.ArrowInvalid):  # a part renamed away while listed
                continue
            if n >= saved and proc.poll() is None:
                proc.send_signal(sig)
                signalled = f"{n} ids on disk, {time.monotonic() - start:.1f} s after the start"
                break
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    done.signalled = signalled
    return done


N_ROWS = 400
N_BAD = 4


@pytest.fixture
def big_input(tmp_path):
    rows = [{"id": f"r{i:04d}", "prompt": sentence(i)} for i in range(N_ROWS - N_BAD)]
    rows += [{"id": f"bad{i}", "prompt": ""} for i in range(N_BAD)]
    return write_prompts(tmp_path / "in" / "p.parquet", rows)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_run_stopped_midway_keeps_its_parts_and_the_rerun_decodes_only_the_rest(
        chat_model_dir, big_input, tmp_path, sig):
    out = tmp_path / "out"
    # 64 new tokens a row and a stop at an eighth: the tiny model decodes 400 rows of 8 tokens in
    # under a second, so the signal could land after the last row (measured: the run then ends 0).
    job = _job_file(tmp_path, chat_model_dir, big_input, out, new_tokens=64, rows_per_file=20, rows_per_batch=8)
    stopped = _run_until(job, out, saved=N_ROWS // 8, sig=sig)
    assert stopped.signalled, "the run ended before the signal: " + stopped.stderr[-1000:]
    assert stopped.returncode != 0, f"signalled at {stopped.signalled}\n" + stopped.stdout[-1000:] + stopped.stderr[-2000:]
    kept = set(_ids(out))
    assert len(kept) >= N_ROWS // 8  # what was saved before the signal is still there
    assert not list(out.glob("job_stats.json"))
    if sig == signal.SIGINT:  # Ctrl-C says what was kept, counted from the output itself
        assert f"kept {len(kept)} completion(s)" in stopped.stderr, stopped.stderr[-2000:]

    again = build(job_spec(chat_model_dir, big_input, out, mode="ar", max_new_tokens=64, rows_per_file=20,
                           rows_per_batch=8)).run()

    ids = _ids(out)
    assert sorted(ids) == sorted(set(ids))  # each id exactly once, on disk
    assert again.metrics["completions"] == N_ROWS - N_BAD - len(kept)  # only the rest was decoded
    assert again.metrics["skipped_completed"] == len(kept)
    stats = job_stats(out)
    assert stats["rows_in"] == N_ROWS == stats["completions_out"] + stats["dead_letters"]
    assert stats["dead_letters_by_kind"] == {"invalid_row": N_BAD}
    assert not [p for p in out.iterdir() if PARTIAL in p.name or p.name.startswith("beam-temp-")]


@pytest.mark.slow
def test_chunked_runs_keep_every_dead_letter_and_add_up(chat_model_dir, tmp_path):
    out = tmp_path / "out"
    chunks = []
    for c in range(2):
        rows = [{"id": f"c{c}-{i:02d}", "prompt": sentence(i)} for i in range(12)]
        rows += [{"id": f"c{c}-empty", "prompt": ""}, {"id": f"c{c}-00", "prompt": "twice"}, {"prompt": f"no id {c}"}]
        chunks.append(write_prompts(tmp_path / f"chunk{c}" / "p.parquet", rows))
    for path in chunks:
        build(job_spec(chat_model_dir, path, out, rows_per_file=5)).run()

    stats = job_stats(out)
    assert stats["rows_in"] == 30 == stats["completions_out"] + stats["dead_letters"]
    assert stats["completions_out"] == 24 and len(set(_ids(out))) == 24
    assert stats["dead_letters_by_kind"] == {"invalid_row": 2, "duplicate_id": 2, "missing_id": 2}
    assert len(dead_letters(out)) == 6  # the second chunk deleted none of the first's

    # A third chunk resends one bad row, fixed: its id is complete, so it is no longer dead.
    fixed = write_prompts(tmp_path / "chunk2" / "p.parquet", [{"id": "c0-empty", "prompt": "now fixed"}])
    build(job_spec(chat_model_dir, fixed, out, rows_per_file=5)).run()
    stats = job_stats(out)
    assert (stats["rows_in"], stats["completions_out"], stats["dead_letters"]) == (31, 25, 5)
    assert stats["dead_letters_by_kind"] == {"duplicate_id": 2, "missing_id": 2, "invalid_row": 1}
    assert stats["rows_in"] - 1 == stats["completions_out"] + stats["dead_letters"]  # the fixed row came twice


def test_a_retried_bundle_counts_once_for_the_rerun_and_the_job(chat_model_dir, tmp_path):
    """A Dataflow retry, simulated: a bundle's completions saved a second time under another cut."""
    rows = [{"id": f"r{i:02d}", "prompt": sentence(i)} for i in range(10)]
    inputs = write_prompts(tmp_path / "in" / "p.parquet", rows)
    out = tmp_path / "out"
    build(job_spec(chat_model_dir, inputs, out, rows_per_file=4)).run()
    first = sorted(out.glob("completions-*.parquet"))[0]
    table = pq.read_table(first)
    pq.write_table(table.slice(1), out / part_name("completions-", table.column("id").to_pylist()[1:]))

    again = build(job_spec(chat_model_dir, inputs, out, rows_per_file=4)).run()
    assert again.metrics.get("completions", 0) == 0  # the rerun saw every id as complete
    assert len(_ids(out)) == 10 + table.num_rows - 1  # the duplicate is on disk ...
    stats = job_stats(out)
    assert stats["completions_out"] == 10 == len(read_outcomes(str(out)).completed)  # ... and counts once
    assert stats["rows_in"] == stats["completions_out"] + stats["dead_letters"]


def test_leftovers_of_dead_runs_are_removed_after_a_finished_run(chat_model_dir, tmp_path):
    inputs = write_prompts(tmp_path / "in" / "p.parquet", [{"id": "a", "prompt": sentence(1)}])
    out = tmp_path / "out"
    (out / "beam-temp-completions-0123").mkdir(parents=True)
    (out / "beam-temp-completions-0123" / "x.parquet").write_bytes(b"half")
    (out / f"completions-abc.parquet{PARTIAL}42").write_bytes(b"half")
    build(job_spec(chat_model_dir, inputs, out)).run()
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if PARTIAL in n or n.startswith("beam-temp-")], names
    assert len(completions(out)) == 1


def test_shards_that_differ_only_in_integer_width_are_one_job(chat_model_dir, tmp_path):
    narrow = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("max_new_tokens", pa.int32())])
    wide = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("max_new_tokens", pa.int64())])
    write_prompts(tmp_path / "in" / "a.parquet", [{"id": "a", "prompt": sentence(1), "max_new_tokens": 3}], narrow)
    write_prompts(tmp_path / "in" / "b.parquet", [{"id": "b", "prompt": sentence(2), "max_new_tokens": 4}], wide)
    build(job_spec(chat_model_dir, tmp_path / "in", tmp_path / "out")).run()
    rows = {r["id"]: r for r in completions(tmp_path / "out")}
    assert rows["a"]["completion_tokens"] <= 3 and rows["b"]["completion_tokens"] <= 4


def test_run_stats_record_each_input_file_with_its_rows(chat_model_dir, tmp_path):
    inputs = write_prompts(tmp_path / "in" / "p.parquet", [{"id": f"r{i}", "prompt": sentence(i)} for i in range(3)])
    out = tmp_path / "out"
    run = build(job_spec(chat_model_dir, inputs, out)).run()
    [record] = [json.loads(p.read_text()) for p in out.glob("run_stats-*.json")]
    assert record["inputs"] == {str(inputs): 3} and run.stats["rows_in_this_run"] == 3
