"""Reruns skip ids already completed: after an interrupted run, a rerun yields each id exactly once."""

from __future__ import annotations

import shutil

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
    return job_spec(chat_model_dir, inputs, out, **{"rows_per_file": 4, "rows_per_batch": 4, **flags})


def test_rerun_after_an_interrupted_run_yields_each_id_once(chat_model_dir, inputs, tmp_path):
    out = tmp_path / "out"
    build(_argv(chat_model_dir, inputs, out)).run()
    reference = stable(completions(out))
    # Interrupt the run as a crash would: some completion parts were never written, the job stats
    # were not, and a retried bundle wrote a dead-letter part a second time under another name.
    files = sorted(out.glob("completions-*.parquet"))
    assert len(files) >= 3  # parts of at most rows_per_file rows
    lost = {i for f in files[1:] for i in pq.read_table(f).column("id").to_pylist()}
    for f in files[1:]:
        f.unlink()
    kept = N_GOOD - len(lost)
    (out / "job_stats.json").unlink()
    [dl] = out.glob("dead_letters-*.parquet")
    shutil.copy(dl, out / "dead_letters-retried.parquet")

    again = build(_argv(chat_model_dir, inputs, out)).run()

    ids = [r["id"] for r in completions(out)]
    assert sorted(ids) == sorted(set(ids)) == sorted(reference)  # every id, exactly once
    assert stable(completions(out)) == reference  # and the same completions
    assert {d["id"] for d in dead_letters(out)} == {"bad"}  # no run deletes another's part...
    stats = job_stats(out)
    assert stats["dead_letters"] == 1 and stats["dead_letters_by_kind"] == {"invalid_row": 1}  # ...it counts once
    assert stats["completions_this_run"] == len(lost)
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
    # No empty file: the rerun wrote no completion part, and its one dead letter's part rewrote the old one.
    assert sorted(p.name for p in out.glob("completions-*.parquet")) == files
    assert len(list(out.glob("dead_letters-*.parquet"))) == 1
    assert all(pq.ParquetFile(p).metadata.num_rows for p in out.glob("*.parquet"))


def test_rerun_with_settings_that_change_completions_is_refused(chat_model_dir, inputs, tmp_path):
    out = tmp_path / "out"
    build(_argv(chat_model_dir, inputs, out)).run()
    with pytest.raises(JobRefused, match=r"max_new_tokens 8 -> 6"):
        build(_argv(chat_model_dir, inputs, out, max_new_tokens=6))
    # Settings that do not change a row's output may differ (here: the batch shape).
    build(_argv(chat_model_dir, inputs, out, rows_per_batch=2))
