"""``dflash-batch run`` / ``make-example-input`` / ``bench-pipeline`` on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from job_helpers import DECODE, completions, job_stats, sentence, write_prompts

from dflash_batch.jobs.cli import main


@pytest.fixture(autouse=True)
def few_block_candidates(monkeypatch):
    """An automatic block length picks among 1, 2 and 4 here, not up to 16: these tests check the
    commands' plumbing, which is the same for any candidates, and the largest lengths' programs
    would take most of the compile time."""
    from dflash_batch.decoder import _state

    monkeypatch.setattr(_state, "PROPOSER_BLOCK", 4)


@pytest.fixture
def job_file(tmp_path, chat_model_dir) -> Path:
    write_prompts(tmp_path / "in" / "p.parquet", [{"id": f"r{i}", "prompt": sentence(i)} for i in range(5)]
                  + [{"id": "r0", "prompt": "again"}])
    buckets = DECODE["prompt_buckets"]
    path = tmp_path / "job.toml"
    path.write_text(f"""
name = "cli-test"
input = "{tmp_path}/in/*.parquet"
output = "{tmp_path}/out"
[model]
target = "{chat_model_dir}"
[decode]
batch_size = {DECODE['batch_size']}
max_new_tokens = {DECODE['max_new_tokens']}
prompt_buckets = {buckets}
[prompt]
template = "none"
""")
    return path


def test_run_prints_where_the_output_went_and_a_rerun_resumes(job_file, tmp_path):
    result = CliRunner().invoke(main, ["run", str(job_file), "--no-progress"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert f"output: {out}" in result.output and f"job stats:    {out}/job_stats.json" in result.output
    assert "6 in -> 5 completions" in result.output and "1 dead letters" in result.output
    assert "dead letter x1 duplicate_id: e.g. duplicate id 'r0'" in result.output
    assert len(completions(out)) == 5 and job_stats(out)["name"] == "cli-test"

    again = CliRunner().invoke(main, ["run", str(job_file), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert "resuming: 5 ids already complete" in again.output and "(0 this run, 5 done earlier)" in again.output


def test_run_with_progress_bar(job_file, tmp_path):
    result = CliRunner().invoke(main, ["run", str(job_file), "--set", "name=with-bar"])
    assert result.exit_code == 0, result.output
    assert "with-bar:" in result.output and "6/6" in result.output  # the bar reached every row


def test_a_bad_override_is_refused_before_any_work(job_file, tmp_path):
    result = CliRunner().invoke(main, ["run", str(job_file), "--set", "decode.batch_size=0"])
    assert result.exit_code == 2
    assert "decode.batch_size must be a positive integer, got 0" in result.output
    assert not (tmp_path / "out").exists()


def test_a_missing_input_is_refused_naming_the_field(job_file, tmp_path):
    result = CliRunner().invoke(main, ["run", str(job_file), "--set", f"input={tmp_path}/nothing.parquet"])
    assert result.exit_code == 2
    assert "refused before any work started: input:" in result.output and "does not exist" in result.output


def test_make_example_input_writes_aclsum_abstracts(tmp_path):
    if importlib.util.find_spec("aclsum") is None:  # its data files only; importing it needs extras
        pytest.skip("ACLSum data is not installed (pip install --no-deps aclsum==0.1.2)")
    result = CliRunner().invoke(main, ["make-example-input", str(tmp_path / "x" / "in.parquet"), "--limit", "3"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "x" / "in.parquet")
    assert table.column_names == ["id", "document", "title"] and table.num_rows == 3
    assert all(len(d) > 100 for d in table.column("document").to_pylist())


def test_bench_pipeline_reports_the_overhead_ratio(job_file):
    result = CliRunner().invoke(main, ["bench-pipeline", str(job_file), "--limit", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["rows"] == 4 and report["completion_tokens"]["job"] == report["completion_tokens"]["decoder_only"]
    assert report["overhead_ratio"] > 0
    assert report["dtype"] == load_spec_dtype(job_file)


def load_spec_dtype(job_file) -> str:
    """The dtype the job in ``job_file`` resolves to on this machine."""
    from dflash_batch.jobs._spec import load_spec
    from dflash_batch.pipeline import job_dtype

    return job_dtype(load_spec(job_file))


@pytest.mark.slow
def test_bench_takes_the_jobs_prompts_and_settings(job_file):
    result = CliRunner().invoke(main, ["bench", str(job_file), "--batch-sizes", "1,2", "--block-sizes", "2",
                                       "--modes", "ngram", "--num-prompts", "3", "--repeats", "2", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output[result.output.index("["):])
    assert [(r["batch_size"], r["mode"], r["block_size"]) for r in rows] == [
        (b, m, blk) for b in (1, 2) for m, blk in (("ar", 1), ("ngram", 2), ("ngram", "auto"))]
    for r in rows:
        assert r["identical_fraction"] == 1.0  # lossless: the same tokens as AR, row for row
        assert len(r["runs"]) == len(r["speedup_runs"]) == 2 and r["ar_tokens_per_s"] > 0
        assert len(r["learning_runs"]) == 1  # a first round, where auto learns acceptance, is not counted
        assert r["num_prompts"] == 3
        if r["batch_size"] == 1:  # one row per turn: the median of 2 rounds x 3 rows' paired ratios
            assert r["speedup_from"] == "paired rows" and len(r["speedup_rows"]) == 6
            assert r["speedup"] == pytest.approx(statistics.median(r["speedup_rows"]))
        else:
            assert r["speedup_from"] == "rounds" and r["speedup_rows"] is None
            assert r["speedup"] == pytest.approx(sum(r["speedup_runs"]) / 2)  # the median of two same-round ratios
        assert r["tau_mean"] >= 1.0
    assert all(r["speedup"] == 1.0 for r in rows if r["mode"] == "ar")
    assert "auto" in rows[2] and rows[2]["auto"]  # the automatic block choice and why


def test_bench_refuses_a_bad_job_before_any_work(job_file):
    result = CliRunner().invoke(main, ["bench", str(job_file), "--set", "decode.batch_size=0"])
    assert result.exit_code == 2 and "decode.batch_size must be a positive integer, got 0" in result.output


def test_bench_max_new_tokens_overrides_the_jobs(job_file):
    result = CliRunner().invoke(main, ["bench", str(job_file), "--batch-sizes", "2", "--modes", "",
                                       "--num-prompts", "2", "--repeats", "1", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "the first rows of" in result.output and "up to 3 new tokens" in result.output


@pytest.mark.slow
def test_bench_decodes_four_rows_per_slot_by_default_and_auto_only(job_file):
    result = CliRunner().invoke(main, ["bench", str(job_file), "--batch-sizes", "1", "--block-sizes", "",
                                       "--modes", "ngram", "--repeats", "1", "--ar-control", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output[result.output.index("["):])
    assert [(r["mode"], r["block_size"], r["num_prompts"]) for r in rows] == [
        ("ar", 1, 4), ("ar-control", 1, 4), ("ngram", "auto", 4)]
    control = rows[1]  # a second AR decoder in the same rounds: the bench's own noise
    assert control["identical_fraction"] == 1.0 and len(control["speedup_runs"]) == 1
    assert control["speedup_runs"][0] > 0 and control["tau_mean"] == 1.0


@pytest.mark.slow
def test_bench_hf_generate_gives_the_same_tokens_as_ar(job_file):
    result = CliRunner().invoke(main, ["bench", str(job_file), "--batch-sizes", "2", "--modes", "", "--num-prompts",
                                       "3", "--repeats", "2", "--hf", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output[result.output.index("["):])
    assert [r["mode"] for r in rows] == ["ar", "hf-generate"]
    hf = rows[1]
    assert hf["identical_fraction"] == 1.0  # transformers' greedy decode of the same checkpoint, token for token
    assert len(hf["runs"]) == 2 and min(hf["runs"]) > 0


@pytest.fixture
def ledger(tmp_path, monkeypatch):
    monkeypatch.setenv("DFLASH_BATCH_LEDGER", str(tmp_path / "ledger.sqlite"))


def _figure(pattern: str, text: str) -> str:
    [value] = re.findall(pattern, text)
    return value


def test_run_summary_job_stats_and_audit_show_the_same_figures(job_file, tmp_path, ledger):
    run = CliRunner().invoke(main, ["run", str(job_file), "--no-progress"])
    assert run.exit_code == 0, run.output
    audit = CliRunner().invoke(main, ["audit", str(tmp_path / "out")])
    assert audit.exit_code == 0, audit.output
    decode = r"decode (\d+\.\d+ s)"
    rate = r"tokens/s: \d+\.\d+ over wall time, (\d+\.\d+) while decoding"
    assert _figure(decode, run.output) == _figure(decode, audit.output)
    assert _figure(rate, run.output) == _figure(rate, audit.output)
    stats = job_stats(tmp_path / "out")
    assert f"decode {stats['decode_seconds']:.2f} s" in run.output
    assert f"{stats['decode_tokens_per_s']:.1f} while decoding" in audit.output
    assert stats["wall_seconds"] >= stats["decode_seconds"] + stats["compile_seconds"]


def test_the_run_summary_and_the_audit_name_the_dtype_the_job_ran_in(job_file, tmp_path, ledger):
    run = CliRunner().invoke(main, ["run", str(job_file), "--no-progress", "--set", "model.dtype=bfloat16"])
    assert run.exit_code == 0, run.output
    assert f"model {json.loads((tmp_path / 'out' / 'job_manifest.json').read_text())['model']} in bfloat16" \
        in run.output
    assert "mode ar, dtype bfloat16, batch 2" in run.output
    assert job_stats(tmp_path / "out")["dtype"] == "bfloat16"
    audit = CliRunner().invoke(main, ["audit", str(tmp_path / "out")])
    assert "mode ar, dtype bfloat16, batch 2" in audit.output


def test_one_job_id_in_the_ledger_the_stats_and_the_report(job_file, tmp_path, ledger):
    from dflash_batch.jobs._ledger import list_jobs

    run = CliRunner().invoke(main, ["run", str(job_file), "--no-progress"])
    assert run.exit_code == 0, run.output
    [row] = list_jobs()
    stats = job_stats(tmp_path / "out")
    assert row["job_id"] == stats["job_id"] and row["job_id"] in run.output
    by_id = CliRunner().invoke(main, ["audit", stats["job_id"]])
    assert by_id.exit_code == 0, by_id.output
    assert stats["job_id"] in (tmp_path / "out" / "report.html").read_text()


def test_a_resume_with_nothing_to_do_says_so_and_leaves_no_empty_files(job_file, tmp_path, ledger):
    assert CliRunner().invoke(main, ["run", str(job_file), "--no-progress"]).exit_code == 0
    out = tmp_path / "out"
    files = sorted(p.name for p in out.glob("*.parquet"))
    again = CliRunner().invoke(main, ["run", str(job_file), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert "nothing left to do: 5 of 5 ids already complete" in again.output
    assert "None" not in again.output and "no model loaded: nothing to decode" in again.output
    assert [p for p in out.glob("*.parquet") if pq.ParquetFile(p).metadata.num_rows == 0] == []
    completions_now = sorted(p.name for p in out.glob("completions-*.parquet"))
    assert completions_now == [f for f in files if f.startswith("completions-")]  # no new file
    stats = job_stats(out)
    assert len(stats["runs"]) == 2 and stats["this_run"]["completion_tokens"] == 0
    assert stats["completion_tokens"] == stats["runs"][0]["completion_tokens"]  # the job's, over both runs
    assert stats["wall_seconds"] == pytest.approx(sum(r["wall_seconds"] for r in stats["runs"]), abs=2e-3)
    assert "job, over its 2 runs:" in again.output
    audit = CliRunner().invoke(main, ["audit", str(job_file)])  # the job file names the output
    assert audit.exit_code == 0, audit.output
    assert "None" not in audit.output
    assert _figure(r"job, over its 2 runs:\n    time: .*decode (\d+\.\d+ s)", audit.output) == \
        f"{stats['decode_seconds']:.2f} s"


def test_a_failed_run_exits_1_and_a_refused_spec_exits_2(job_file, monkeypatch, ledger):
    from dflash_batch.pipeline import BuiltJob

    def fail(self):
        raise RuntimeError("the runner broke")

    monkeypatch.setattr(BuiltJob, "run", fail)
    failed = CliRunner().invoke(main, ["run", str(job_file), "--no-progress"])
    assert failed.exit_code == 1 and "failed: RuntimeError: the runner broke" in failed.output
    for command in (["run"], ["bench-pipeline"], ["submit", "--dry-run"]):
        refused = CliRunner().invoke(main, [command[0], str(job_file), *command[1:], "--set", "decode.batch_size=0"])
        assert refused.exit_code == 2, (command, refused.output)
        assert "decode.batch_size must be a positive integer, got 0" in refused.output


def test_run_help_names_the_runner_it_uses():
    text = CliRunner().invoke(main, ["run", "--help"]).output
    assert "FnApiRunner" in text and "exit status" in text.lower()


def test_bench_refuses_a_mesh_this_machine_lacks(job_file):
    result = CliRunner().invoke(main, ["bench", str(job_file), "--batch-sizes", "2", "--modes", "ngram",
                                       "--data-parallel", "2", "--num-prompts", "2", "--repeats", "1"])
    assert result.exit_code == 1, result.output
    assert "--data-parallel" in result.output and "needs 2 chips, but cpu x1 has 1" in result.output
