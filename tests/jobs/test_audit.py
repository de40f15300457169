"""``dflash-batch audit``: rows and tokens recomputed from the completions, time and throughput
from the runs' records (per run and for the job), and an HTML report with informative plots."""

from __future__ import annotations

import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dflash_batch.jobs import _ledger
from dflash_batch.jobs.cli import main
from dflash_batch.schemas import COMPLETIONS_SCHEMA, DEAD_LETTER_KINDS, DEAD_LETTERS_SCHEMA


def completion(i: int, bucket: int, batch: int, hist: list[int], seconds: float) -> dict:
    steps = sum(hist)
    tokens = sum((k + 1) * n for k, n in enumerate(hist))
    return {"id": f"r{i}", "completion": "x", "completion_token_ids": [1] * tokens, "finish_reason": "length",
            "prompt_tokens": bucket // 2 + i, "completion_tokens": tokens, "decode_steps": steps,
            "acceptance_length_mean": tokens / steps, "accepted_per_step": hist, "draft_tokens_proposed": 0,
            "draft_tokens_accepted": 0, "bucket": bucket, "batch_index": batch, "worker": "w:1",
            "decode_seconds": seconds, "model": "m", "drafter": "d", "mode": "dflash"}


def run_record(run_id: str, wall: float, compile_s: float, decode: float, rows: list[dict]) -> dict:
    """A run's record as the pipeline writes it (run_stats-<run>.json)."""
    buckets: dict[str, dict] = {}
    for r in rows:
        b = buckets.setdefault(str(r["bucket"]), {"rows": 0, "completion_tokens": 0, "decode_seconds": 0.0})
        b["rows"] += 1
        b["completion_tokens"] += r["completion_tokens"]
    for b in buckets.values():  # the run's decode seconds shared by tokens (the pipeline measures them per batch)
        b["decode_seconds"] = decode * b["completion_tokens"] / max(sum(r["completion_tokens"] for r in rows), 1)
    return {"run_id": run_id, "job_id": f"audit-test-{run_id}", "started_at": "2026-01-01T00:00:00+00:00",
            "wall_seconds": wall, "load_seconds": 0.5 if rows else 0.0, "compile_seconds": compile_s,
            "decode_seconds": decode, "rows": len(rows), "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
            "completion_tokens": sum(r["completion_tokens"] for r in rows), "model_loads": 1 if rows else 0,
            "buckets": buckets, "hardware": ["cpu:cpu x1"] if rows else [], "workers": ["w:1"] if rows else []}


ROWS = [completion(0, 16, 1, [2, 1, 1], 0.5), completion(1, 16, 1, [0, 3, 0], 0.5),
        completion(2, 64, 2, [1, 0, 2, 1], 0.25), completion(3, 64, 3, [4], 0.2)]


@pytest.fixture
def output(tmp_path):
    """Two runs into one output: run a decoded rows 0-1, run b (a resume) rows 2-3."""
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[:2], schema=COMPLETIONS_SCHEMA), out / "completions-a-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[2:], schema=COMPLETIONS_SCHEMA), out / "completions-b-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist([{"id": "bad", "kind": "duplicate_id", "error": "duplicate id 'r0'",
                                          "row_json": "{}", "source": "x"}],
                                        schema=DEAD_LETTERS_SCHEMA), out / "dead_letters-b-00000-of-00001.parquet")
    (out / "run_stats-a.json").write_text(json.dumps(run_record("a", 4.0, 1.5, 1.0, ROWS[:2])))
    (out / "run_stats-b.json").write_text(json.dumps(run_record("b", 3.0, 0.5, 0.5, ROWS[2:])))
    stats = {"job_id": "audit-test-b", "name": "audit-test", "rows_in": 5, "mode": "dflash", "batch_size": 2,
             "block_size": "4", "hardware": "cpu",
             "spec_json": json.dumps({"decode": {"batch_size": 2}, "pipeline": {"rows_per_batch": 0}})}
    (out / "job_stats.json").write_text(json.dumps(stats))
    return out


def test_audit_json_adds_up_what_the_completions_hold(output):
    result = CliRunner().invoke(main, ["audit", str(output), "--json"])
    assert result.exit_code == 0, result.output
    a = json.loads(result.output)
    table = [r for p in sorted(output.glob("completions-*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert a["completions"] == len(table) == 4 and a["dead_letters"] == 1
    assert a["prompt_tokens"] == sum(r["prompt_tokens"] for r in table)
    assert a["completion_tokens"] == sum(r["completion_tokens"] for r in table)
    hist = [sum(r["accepted_per_step"][k] if k < len(r["accepted_per_step"]) else 0 for r in table)
            for k in range(4)]
    assert a["tau_histogram"] == hist
    assert a["tau_mean"] == pytest.approx(sum((k + 1) * n for k, n in enumerate(hist)) / sum(hist), abs=1e-4)
    b16, b64 = a["buckets"]
    assert (b16["bucket"], b16["rows"], b16["calls"]) == (16, 2, 1)
    assert b16["padding_waste"] == pytest.approx(1 - (8 + 9) / (2 * 16), abs=1e-4)
    assert b16["batch_fill"] == pytest.approx(2 / 8)  # rows_per_batch 0 -> 4 x batch_size
    assert b16["tokens_per_s"] == pytest.approx(b16["completion_tokens"] / b16["decode_seconds"], abs=1e-3)
    assert b16["decode_seconds"] == 1.0  # the run's record, not the slowest row (0.5 s)
    assert (b64["rows"], b64["calls"], b64["decode_seconds"]) == (2, 2, 0.5)
    assert a["dead_letters_by_kind"] == {"duplicate_id": 1}
    assert a["dead_letter_examples"] == {"duplicate_id": "duplicate id 'r0'"}
    assert a["speedup_over_ar"] is None


def test_after_a_resume_each_figure_sums_the_runs_and_each_rate_divides_the_same_runs(output):
    a = json.loads(CliRunner().invoke(main, ["audit", str(output), "--json"]).output)
    assert [r["run_id"] for r in a["runs"]] == ["a", "b"]
    assert (a["wall_seconds"], a["compile_seconds"], a["decode_seconds"]) == (7.0, 2.0, 1.5)
    tokens = sum(r["completion_tokens"] for r in ROWS)
    assert a["rate_completion_tokens"] == tokens
    assert a["tokens_per_s"] == pytest.approx(tokens / 7.0, abs=1e-3)  # all runs' tokens over all runs' wall
    assert a["decode_tokens_per_s"] == pytest.approx(tokens / 1.5, abs=1e-3)
    first = a["runs"][0]
    assert first["tokens_per_s"] == pytest.approx(first["completion_tokens"] / 4.0, abs=1e-3)
    text = CliRunner().invoke(main, ["audit", str(output)]).output
    assert "runs (2; a resume is a run of its own)" in text and "audit-test-a:" in text
    assert "job, over its 2 runs:\n    time: wall 7.00 s, model load 1.00 s, compile 2.00 s, decode 1.50 s" in text


def test_a_resume_that_decoded_nothing_adds_its_wall_time_and_no_tokens(output):
    (output / "run_stats-c.json").write_text(json.dumps(run_record("c", 2.0, 0.0, 0.0, [])))
    a = json.loads(CliRunner().invoke(main, ["audit", str(output), "--json"]).output)
    tokens = sum(r["completion_tokens"] for r in ROWS)
    assert a["wall_seconds"] == 9.0 and a["decode_seconds"] == 1.5
    assert a["tokens_per_s"] == pytest.approx(tokens / 9.0, abs=1e-3)
    assert a["wall_seconds"] >= a["decode_seconds"]
    text = CliRunner().invoke(main, ["audit", str(output)]).output
    assert "None" not in text and "on cpu:cpu x1" in text


def test_dead_letters_are_grouped_by_kind_and_kinds_beyond_the_top_ones_are_counted(output):
    kinds = list(DEAD_LETTER_KINDS[:8]) + [DEAD_LETTER_KINDS[0]]
    pq.write_table(pa.Table.from_pylist([{"id": f"d{i}", "kind": k, "error": f"{k} of row d{i}", "row_json": "{}",
                                          "source": "x"} for i, k in enumerate(kinds)], schema=DEAD_LETTERS_SCHEMA),
                   output / "dead_letters-b-00000-of-00001.parquet")
    text = CliRunner().invoke(main, ["audit", str(output)]).output
    assert f"dead letter x2 {kinds[0]}: e.g. {kinds[0]} of row d0" in text  # two rows, two texts: one kind
    assert len(re.findall(r"dead letter x\d+ ", text)) == 5
    assert "and 3 more dead letter(s) of 3 other kind(s) (see dead_letters-*.parquet)" in text


def test_a_retried_part_and_a_later_completion_count_once(output):
    """An id saved twice (a retried bundle) is one completion; a dead letter whose id was completed
    by a later run no longer counts."""
    [first] = sorted(output.glob("completions-a-*.parquet"))
    shutil.copy(first, output / "completions-retry.parquet")
    pq.write_table(pa.Table.from_pylist([{"id": ROWS[0]["id"], "kind": "decode_failed", "error": "oom",
                                          "row_json": "{}", "source": "x"}], schema=DEAD_LETTERS_SCHEMA),
                   output / "dead_letters-old.parquet")
    a = json.loads(CliRunner().invoke(main, ["audit", str(output), "--json"]).output)
    assert a["completions"] == 4 and a["dead_letters"] == 1 and a["dead_letters_by_kind"] == {"duplicate_id": 1}
    assert a["completion_tokens"] == sum(r["completion_tokens"] for r in ROWS)


def plot_ids(page: str) -> list[str]:
    return re.findall(r'<img data-plot="(\w+)" alt="[^"]+" src="data:image/png;base64,', page)


def test_html_report_plots_per_bucket_only_for_several_buckets_with_human_captions(output):
    result = CliRunner().invoke(main, ["audit", str(output)])
    assert result.exit_code == 0, result.output
    assert "tau: mean" in result.output and f"report: {output}/report.html" in result.output
    page = (output / "report.html").read_text()
    assert plot_ids(page) == ["tau_histogram", "tokens_per_s", "padding_waste"]
    captions = re.findall(r"<figcaption>([^<]+)</figcaption>", page)
    assert len(captions) == 3 and all(" " in c and "_" not in c for c in captions)
    assert "--baseline" in page  # how to get a speedup over AR

    for p in output.glob("completions-b-*"):  # one bucket left: its numbers are in the table
        p.unlink()
    (output / "run_stats-b.json").unlink()
    CliRunner().invoke(main, ["audit", str(output)])
    assert plot_ids((output / "report.html").read_text()) == ["tau_histogram"]


def test_a_baseline_gives_a_speedup_figure(output, tmp_path):
    ar = tmp_path / "ar"
    ar.mkdir()
    rows = [dict(r, mode="ar", accepted_per_step=[r["completion_tokens"]]) for r in ROWS]
    pq.write_table(pa.Table.from_pylist(rows, schema=COMPLETIONS_SCHEMA), ar / "completions-z-00000-of-00001.parquet")
    (ar / "run_stats-z.json").write_text(json.dumps(run_record("z", 9.0, 1.0, 6.0, rows)))
    (ar / "job_stats.json").write_text(json.dumps({"job_id": "ar-z", "name": "ar", "mode": "ar", "batch_size": 2}))
    result = CliRunner().invoke(main, ["audit", str(output), "--baseline", str(ar), "--json"])
    assert result.exit_code == 0, result.output
    a = json.loads(result.output)
    tokens = sum(r["completion_tokens"] for r in ROWS)
    assert a["speedup_over_ar"]["speedup"] == pytest.approx((tokens / 1.5) / (tokens / 6.0), abs=1e-3)
    page = (output / "report.html").read_text()
    assert "speedup" in plot_ids(page) and "--baseline OUTPUT-ar" not in page


def test_the_automatic_block_choice_is_reported_and_plotted(output):
    stats = json.loads((output / "job_stats.json").read_text())
    stats["block_size"] = "auto"
    stats["block_choice"] = {
        "worker w:1 bucket 64": {"candidates": [1, 2, 4], "decode_calls_by_block": {"1": 5, "2": 1, "4": 1},
                                 "gated_fraction_by_block": {"2": 0.25, "4": 0.5},
                                 "expected_tokens_per_s_per_row": {"1": 9.6, "2": 8.0, "4": 6.9}},
        "worker w:1 bucket 16": {"candidates": [4], "decode_calls_by_block": {"4": 3}},  # fixed: no choice
    }
    (output / "job_stats.json").write_text(json.dumps(stats))
    a = json.loads(CliRunner().invoke(main, ["audit", str(output), "--json"]).output)
    assert a["block_choice"] == [{"where": "worker w:1 bucket 64", "calls_by_block": {"1": 5, "2": 1, "4": 1},
                                  "gated_fraction_by_block": {"2": 0.25, "4": 0.5},
                                  "expected_tokens_per_s_per_row": {"1": 9.6, "2": 8.0, "4": 6.9},
                                  "most_run": 1, "best_expected": 1}]
    result = CliRunner().invoke(main, ["audit", str(output)])
    assert ("block choice, worker w:1 bucket 64: decode calls L=1 x5, L=2 x1, L=4 x1; "
            "steps run as AR by the gate: L=2 25%, L=4 50%; best expected L=1 at 9.6 tokens/s per row"
            ) in result.output
    page = (output / "report.html").read_text()
    assert plot_ids(page) == ["tau_histogram", "tokens_per_s", "padding_waste", "block_choice"]


def test_speedup_from_a_bench_result(output):
    (output / "bench.json").write_text(json.dumps([{"mode": "dflash", "batch_size": 2, "speedup": 2.5,
                                                    "ar_tokens_per_s": 10.0, "tokens_per_s": 25.0, "block_size": 4}]))
    a = json.loads(CliRunner().invoke(main, ["audit", str(output), "--json"]).output)
    assert a["speedup_over_ar"]["speedup"] == 2.5


def test_the_audit_names_the_dtype_and_takes_the_bench_row_of_that_dtype(output):
    stats = json.loads((output / "job_stats.json").read_text())
    (output / "job_stats.json").write_text(json.dumps({**stats, "dtype": "bfloat16"}))
    bench = [{"mode": "dflash", "batch_size": 2, "dtype": dtype, "speedup": speedup, "ar_tokens_per_s": 10.0,
              "tokens_per_s": 10.0 * speedup, "block_size": 4} for dtype, speedup in (("float32", 1.5), ("bfloat16", 2.5))]
    (output / "bench.json").write_text(json.dumps(bench))
    a = json.loads(CliRunner().invoke(main, ["audit", str(output), "--json"]).output)
    assert a["dtype"] == "bfloat16" and a["speedup_over_ar"]["speedup"] == 2.5
    assert "mode dflash, dtype bfloat16, batch 2" in CliRunner().invoke(main, ["audit", str(output)]).output
    assert "dtype bfloat16" in (output / "report.html").read_text()


def test_a_folder_without_outputs_is_refused_with_status_2(tmp_path):
    result = CliRunner().invoke(main, ["audit", str(tmp_path)])
    assert result.exit_code == 2 and "not a job output" in result.output


def test_audit_takes_the_job_file_or_a_run_id_for_the_output(output, tmp_path, monkeypatch):
    job = tmp_path / "job.toml"
    job.write_text(f'name = "audit-test"\ninput = "{tmp_path}/in/*.parquet"\noutput = "{output}"\n[prompt]\ntemplate = "none"\n')
    by_file = CliRunner().invoke(main, ["audit", str(job), "--json"])
    assert by_file.exit_code == 0, by_file.output
    assert json.loads(by_file.output)["output"] == str(output)

    monkeypatch.setenv("DFLASH_BATCH_LEDGER", str(tmp_path / "ledger.sqlite"))
    _ledger.record_start("audit-test", "{}", "direct", output=str(output), job_id="audit-test-b")
    by_id = CliRunner().invoke(main, ["audit", "audit-test-b", "--json"])
    assert by_id.exit_code == 0, by_id.output
    assert json.loads(by_id.output)["job_id"] == "audit-test-b"
    unknown = CliRunner().invoke(main, ["audit", "audit-test-nope"])
    assert unknown.exit_code == 2 and "not a job output folder, a job file, or a job id in the ledger" in unknown.output


def test_a_decoder_call_is_one_worker_and_batch_index_within_a_bucket():
    from dflash_batch.jobs._audit import _buckets

    def row(bucket, worker, index, prompt_tokens):
        return {"bucket": bucket, "worker": worker, "batch_index": index, "prompt_tokens": prompt_tokens,
                "completion_tokens": 4}

    rows = [row(64, "w1", 0, 32), row(64, "w1", 0, 64), row(64, "w2", 0, 48), row(32, "w1", 0, 16)]
    recorded = {"64": {"decode_seconds": 2.0, "completion_tokens": 12}}
    small, big = _buckets(rows, 4, recorded)
    assert (small["bucket"], small["calls"], small["batch_fill"], small["padding_waste"]) == (32, 1, 0.25, 0.5)
    assert (big["bucket"], big["rows"], big["calls"]) == (64, 3, 2)  # w1 and w2 both ran their batch 0
    assert big["batch_fill"] == pytest.approx(3 / 8) and big["padding_waste"] == pytest.approx(1 - 144 / 192)
    assert small["tokens_per_s"] is None and big["decode_seconds"] == 2.0
