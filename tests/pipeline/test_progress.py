"""Live progress: each phase a worker enters, and a tokens/s rate that moves with decoding."""

from __future__ import annotations

import json

from fresh_process import fresh_worker
from job_helpers import job_spec, sentence, write_prompts

from dflash_batch.pipeline import build, read_progress
from dflash_batch.pipeline._progress import ProgressLog


def _lines(folder, records):
    (folder / "1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_rate_holds_between_reports_and_leaves_out_loading_and_compiling(tmp_path):
    _lines(tmp_path, [{"t": 0.0, "phase": "loading", "bucket": None},
                      {"t": 5.0, "phase": "compiling", "bucket": 384},
                      {"t": 50.0, "phase": "decoding", "bucket": 384},
                      {"t": 52.0, "rows": 1, "completion_tokens": 100},
                      {"t": 54.0, "rows": 1, "completion_tokens": 100}])
    p = read_progress(tmp_path)
    assert p.moving_rate() == 50.0  # 200 tokens in the 4 s since decoding began, not over 54 s
    assert p["rows"] == 2 and p.phase_text() == "decoding"
    # Read again later, with nothing new: the same rate (tokens over elapsed time would decay).
    assert read_progress(tmp_path).moving_rate() == 50.0


def test_the_rate_follows_the_last_seconds_of_decoding(tmp_path):
    records = [{"t": 0.0, "phase": "decoding", "bucket": 64}]
    records += [{"t": float(t), "rows": 1, "completion_tokens": 10} for t in range(1, 31)]  # 10 tokens/s
    records += [{"t": 30.0 + t / 4, "rows": 1, "completion_tokens": 10} for t in range(1, 41)]  # then 40 tokens/s
    _lines(tmp_path, records)
    assert read_progress(tmp_path).moving_rate(window=10.0) == 40.0


def test_phases_name_the_buckets_being_compiled(tmp_path):
    (tmp_path / "1.jsonl").write_text(json.dumps({"t": 1.0, "phase": "compiling", "bucket": 384}) + "\n")
    (tmp_path / "2.jsonl").write_text(json.dumps({"t": 1.0, "phase": "compiling", "bucket": 2048}) + "\n")
    assert read_progress(tmp_path).phase_text() == "compiling buckets 384, 2048"
    (tmp_path / "2.jsonl").write_text(json.dumps({"t": 1.0, "phase": "loading", "bucket": None}) + "\n")
    assert read_progress(tmp_path).phase_text() == "loading model"


def test_a_repeated_phase_is_written_once(tmp_path):
    log = ProgressLog(str(tmp_path))
    for _ in range(3):
        log.phase("decoding", 64)
    log.phase("compiling", 128)
    assert [json.loads(line)["phase"] for line in next(tmp_path.glob("*.jsonl")).read_text().splitlines()] == [
        "decoding", "compiling"]


def test_a_job_reports_loading_compiling_and_decoding_then_each_row(chat_model_dir, tmp_path):
    source = write_prompts(tmp_path / "in" / "p.parquet", [{"id": f"r{i}", "prompt": sentence(i)} for i in range(5)])
    progress = tmp_path / "progress"
    progress.mkdir()
    with fresh_worker():  # this job loads its model, as a fresh worker does
        build(job_spec(chat_model_dir, source, tmp_path / "out"), progress_dir=str(progress)).run()
    records = [json.loads(line) for f in progress.glob("*.jsonl") for line in f.read_text().splitlines()]
    phases = [(r["phase"], r["bucket"]) for r in sorted(records, key=lambda r: r["t"]) if "phase" in r]
    assert phases[0] == ("loading", None) and phases[1][0] == "compiling" and phases[1][1] in (16, 64)
    assert ("decoding", phases[1][1]) in phases
    row_reports = [r for r in records if r.get("rows")]
    assert len(row_reports) == 5 and all(r["rows"] == 1 and r["completion_tokens"] >= 1 for r in row_reports)
    assert read_progress(progress)["rows"] == 5
