"""Reruns skip ids already completed: after an interrupted run, a rerun yields each id exactly once."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from job_helpers import completions, dead_letters, job_spec, job_stats, sentence, stable, write_prompts

from dflash_batch.pipeline import JobRefused, build

N_GOOD = 12


@pytest.fixture
def inputs(tmp_path):
    rows = [{"id": f"r{i:02d}", "prompt": sentence(i)} for i in range(N_GOOD)] + [{"id": "bad", "prompt": ""}]
    return write_prompts(tmp_path / "in" / "p.parquet", rows)


def _argv(chat_model_dir, inputs, out, **flags):
    return job_spec(chat_model_dir, inputs, out, **{"output_shards": 3, "rows_per_batch": 4, **flags})


def test_rerun_after_an_interrupted_write_yields_each_id_once(chat_model_dir, inputs, tmp_path):
    out = tmp_path / "out"
    build(_argv(chat_model_dir, inputs, out)).run()
    reference = stable(completions(out))
    # Interrupt the run as a crash while Beam renamed its files into place would: only the first
    # of two completion files arrived, the job stats did not, a dead-letter file is there twice.
    files = sorted(out.glob("completions-*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("id")
    for f in files:
        f.unlink()
    kept = 7
    pq.write_table(table.slice(0, kept), files[0].with_name(files[0].name.replace("-of-00003", "-of-00002")))
    lost = set(table.column("id").to_pylist()[kept:])
    (out / "job_stats.json").unlink()
    [dl] = out.glob("dead_letters-*.parquet")
    shutil.copy(dl, out / "dead_letters-19990101T000000Z-aaaaaa-00000-of-00001.parquet")

    again = build(_argv(chat_model_dir, inputs, out)).run()

    ids = [r["id"] for r in completions(out)]
    assert sorted(ids) == sorted(set(ids)) == sorted(reference)  # every id, exactly once
    assert stable(completions(out)) == reference  # and the same completions
    assert [d["id"] for d in dead_letters(out)] == ["bad"]  # the stale dead-letter file is gone
    stats = job_stats(out)
    assert stats["completions_this_run"] == len(lost) == N_GOOD - kept
    assert stats["skipped_completed"] == kept
    assert stats["rows_in"] == N_GOOD + 1 == stats["completions_out"] + stats["dead_letters"]
    assert again.metrics["skipped_completed"] == kept and again.metrics["completions"] == len(lost)


def test_rerun_after_a_crash_before_any_output(chat_model_dir, inputs, tmp_path):
    out = tmp_path / "out"
    build(_argv(chat_model_dir, inputs, out)).prepare_output()  # started, then died before writing
    (out / "beam-temp-completions-x").mkdir()
    build(_argv(chat_model_dir, inputs, out)).run()
    assert sorted(r["id"] for r in completions(out)) == [f"r{i:02d}" for i in range(N_GOOD)]


def test_rerun_of_a_finished_job_decodes_nothing(chat_model_dir, inputs, tmp_path):
    out = tmp_path / "out"
    build(_argv(chat_model_dir, inputs, out)).run()
    files = sorted(p.name for p in out.glob("completions-*.parquet"))
    again = build(_argv(chat_model_dir, inputs, out)).run()
    assert again.stats["completions_this_run"] == 0 and again.metrics.get("completions", 0) == 0
    assert len(completions(out)) == N_GOOD and len(dead_letters(out)) == 1
    # No empty file: the rerun wrote no completion file, and its one dead letter's file replaced the old one.
    assert sorted(p.name for p in out.glob("completions-*.parquet")) == files
    assert again.stats["files"]["completions"] == []
    assert all(pq.ParquetFile(p).metadata.num_rows for p in out.glob("*.parquet"))


def test_rerun_with_settings_that_change_completions_is_refused(chat_model_dir, inputs, tmp_path):
    out = tmp_path / "out"
    build(_argv(chat_model_dir, inputs, out)).run()
    with pytest.raises(JobRefused, match=r"max_new_tokens 8 -> 6"):
        build(_argv(chat_model_dir, inputs, out, max_new_tokens=6))
    # Settings that do not change a row's output may differ (here: the batch shape).
    build(_argv(chat_model_dir, inputs, out, rows_per_batch=2))
