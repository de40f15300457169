"""Each time and throughput figure is defined once: sums over runs, rates over the same runs."""

from __future__ import annotations

import pytest
from job_helpers import job_spec, job_stats, sentence, write_prompts

from dflash_batch.pipeline import Figures, build, rate_line, time_line


def test_rates_divide_the_sums_of_the_same_runs():
    first = Figures(wall_seconds=10.0, compile_seconds=4.0, decode_seconds=5.0, completion_tokens=500, rows=8)
    resume = Figures(wall_seconds=2.0)  # decoded nothing
    job = first + resume
    assert (job.wall_seconds, job.decode_seconds, job.completion_tokens) == (12.0, 5.0, 500)
    assert job.tokens_per_s == round(500 / 12.0, 3) and job.decode_tokens_per_s == 100.0
    assert resume.tokens_per_s == 0.0 and resume.decode_tokens_per_s is None
    assert Figures.from_dict(job.as_dict()) == job
    assert time_line(job) == "wall 12.00 s, model load 0.00 s, compile 4.00 s, decode 5.00 s"
    assert rate_line(job) == "41.7 over wall time, 100.0 while decoding (500 completion tokens)"


def test_a_run_records_its_figures_and_the_job_sums_its_runs(chat_model_dir, tmp_path):
    source = write_prompts(tmp_path / "in" / "p.parquet", [{"id": f"r{i}", "prompt": sentence(i)} for i in range(6)])
    out = tmp_path / "out"
    build(job_spec(chat_model_dir, source, out, rows_per_batch=2)).run()
    first = job_stats(out)
    run = first["this_run"]
    assert run["wall_seconds"] >= run["decode_seconds"] + run["compile_seconds"] > 0
    assert sum(b["decode_seconds"] for b in run["buckets"].values()) == \
        pytest.approx(run["decode_seconds"], abs=2e-3)
    assert first["decode_seconds"] == run["decode_seconds"] and first["completion_tokens"] == run["completion_tokens"]
    assert len(list(out.glob("run_stats-*.json"))) == 1

    write_prompts(tmp_path / "in" / "q.parquet", [{"id": f"s{i}", "prompt": sentence(i + 9)} for i in range(2)])
    build(job_spec(chat_model_dir, tmp_path / "in", out, rows_per_batch=2)).run()  # a resume with 2 new rows
    job = job_stats(out)
    assert len(job["runs"]) == 2 and job["this_run"]["rows"] == 2
    assert job["completion_tokens"] == sum(r["completion_tokens"] for r in job["runs"])
    assert job["decode_seconds"] == round(sum(r["decode_seconds"] for r in job["runs"]), 3)
    assert job["decode_tokens_per_s"] == round(job["completion_tokens"] / job["decode_seconds"], 3)
    assert job["wall_seconds"] >= job["decode_seconds"]


def test_a_resume_that_decoded_nothing_keeps_the_block_choice_of_the_run_that_did():
    from apache_beam.options.pipeline_options import PipelineOptions

    from dflash_batch.pipeline._config import job_config
    from dflash_batch.pipeline._outcomes import Outcomes
    from dflash_batch.pipeline._stats import job_stats_record

    config = job_config(job_spec("m", "/in", "/out", mode="ngram"), PipelineOptions([]))
    choice = {"w:1 bucket 64": {"candidates": [1, 2], "decode_calls_by_block": {"1": 3}}}
    first = {"run_id": "a", "job_id": "job-a", **Figures(wall_seconds=9.0, decode_seconds=4.0,
                                                        completion_tokens=40, rows=4).as_dict(),
             "tau_histogram": [40], "block_choice": choice}
    resume = {"run_id": "b", "job_id": "job-b", "started_at": "", "finished_at": "", "skipped_completed": 4,
              "dead_letters": 0, **Figures(wall_seconds=1.0).as_dict(), "tau_histogram": [], "block_choice": {}}
    record = job_stats_record(config, resume, [first], Outcomes(frozenset("abcd"), {}, (), (), 4))
    assert record["block_choice"] == choice and record["job_id"] == "job-b"
    assert (record["wall_seconds"], record["decode_seconds"], record["tau_mean"]) == (10.0, 4.0, 1.0)
    assert record["tokens_per_s"] == 4.0 and record["decode_tokens_per_s"] == 10.0
