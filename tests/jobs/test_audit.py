"""``dflash-batch audit``: numbers recomputed from the completions, and an HTML report with plots."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dflash_batch.jobs.cli import main
from dflash_batch.schemas import COMPLETIONS_SCHEMA, DEAD_LETTERS_SCHEMA


def completion(i: int, bucket: int, batch: int, hist: list[int], seconds: float) -> dict:
    steps = sum(hist)
    tokens = sum((k + 1) * n for k, n in enumerate(hist))
    return {"id": f"r{i}", "completion": "x", "completion_token_ids": [1] * tokens, "finish_reason": "length",
            "prompt_tokens": bucket // 2 + i, "completion_tokens": tokens, "decode_steps": steps,
            "acceptance_length_mean": tokens / steps, "accepted_per_step": hist, "draft_tokens_proposed": 0,
            "draft_tokens_accepted": 0, "bucket": bucket, "batch_index": batch, "worker": "w:1",
            "decode_seconds": seconds, "model": "m", "drafter": "d", "mode": "dflash"}


@pytest.fixture
def output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    rows = [completion(0, 16, 1, [2, 1, 1], 0.5), completion(1, 16, 1, [0, 3, 0], 0.5),
            completion(2, 64, 2, [1, 0, 2, 1], 0.25), completion(3, 64, 3, [4], 0.2)]
    pq.write_table(pa.Table.from_pylist(rows[:2], schema=COMPLETIONS_SCHEMA), out / "completions-a-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:], schema=COMPLETIONS_SCHEMA), out / "completions-b-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist([{"id": "bad", "error": "duplicate id 'r0'", "row_json": "{}", "source": "x"}],
                                        schema=DEAD_LETTERS_SCHEMA), out / "dead_letters-b-00000-of-00001.parquet")
    stats = {"job_id": "audit-test-b", "name": "audit-test", "rows_in": 5, "wall_seconds": 4.0,
             "compile_seconds": 1.5, "mode": "dflash", "batch_size": 2, "block_size": "4", "hardware": "cpu",
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
    assert a["tokens_per_s"] == pytest.approx(a["completion_tokens"] / 4.0, abs=1e-3)
    assert a["compile_seconds"] == 1.5 and a["wall_seconds"] == 4.0
    b16, b64 = a["buckets"]
    assert (b16["bucket"], b16["rows"], b16["calls"]) == (16, 2, 1)
    assert b16["padding_waste"] == pytest.approx(1 - (8 + 9) / (2 * 16), abs=1e-4)
    assert b16["batch_fill"] == pytest.approx(2 / 8)  # rows_per_batch 0 -> 4 x batch_size
    assert b16["tokens_per_s"] == pytest.approx(b16["completion_tokens"] / 0.5, abs=1e-3)
    assert (b64["rows"], b64["calls"]) == (2, 2)
    assert b64["tokens_per_s"] == pytest.approx(b64["completion_tokens"] / 0.45, abs=1e-3)
    assert a["dead_letter_reasons"] == {"duplicate id 'r0'": 1}
    assert a["speedup_over_ar"] is None


def test_html_report_embeds_its_plots(output):
    result = CliRunner().invoke(main, ["audit", str(output)])
    assert result.exit_code == 0, result.output
    assert "tau: mean" in result.output and f"report: {output}/report.html" in result.output
    page = (output / "report.html").read_text()
    assert len(re.findall(r'<img alt="(\w+)" src="data:image/png;base64,', page)) == 3


def test_the_automatic_block_choice_is_reported_and_plotted(output):
    stats = json.loads((output / "job_stats.json").read_text())
    stats["block_size"] = "auto"
    stats["block_choice"] = {
        "worker w:1 bucket 64": {"candidates": [1, 2, 4], "decode_calls_by_block": {"1": 5, "2": 1, "4": 1},
                                 "drain_calls_by_block": {"1": 2}, "gated_fraction_by_block": {"2": 0.25, "4": 0.5},
                                 "expected_tokens_per_s_per_row": {"1": 9.6, "2": 8.0, "4": 6.9},
                                 "drafter_context_prefills": {"fed": 3, "skipped": 5}},
        "worker w:1 bucket 16": {"candidates": [4], "decode_calls_by_block": {"4": 3}},  # fixed: no choice
    }
    (output / "job_stats.json").write_text(json.dumps(stats))
    a = json.loads(CliRunner().invoke(main, ["audit", str(output), "--json"]).output)
    assert a["block_choice"] == [{"where": "worker w:1 bucket 64", "calls_by_block": {"1": 5, "2": 1, "4": 1},
                                  "drain_calls_by_block": {"1": 2}, "gated_fraction_by_block": {"2": 0.25, "4": 0.5},
                                  "expected_tokens_per_s_per_row": {"1": 9.6, "2": 8.0, "4": 6.9},
                                  "most_run": 1, "best_expected": 1,
                                  "drafter_context_prefills": {"fed": 3, "skipped": 5}}]
    result = CliRunner().invoke(main, ["audit", str(output)])
    assert ("block choice, worker w:1 bucket 64: decode calls L=1 x5, L=2 x1, L=4 x1 (draining L=1 x2); "
            "steps run as AR by the gate: L=2 25%, L=4 50%; best expected L=1 at 9.6 tokens/s per row; "
            "prompts fed to the drafter: 3 of 8") in result.output
    page = (output / "report.html").read_text()
    assert re.findall(r'<img alt="(\w+)"', page) == ["tau_histogram", "tokens_per_s", "padding_waste",
                                                      "block_choice"]


def test_speedup_from_a_bench_result(output):
    (output / "bench.json").write_text(json.dumps([{"mode": "dflash", "batch_size": 2, "speedup": 2.5,
                                                    "ar_tokens_per_s": 10.0, "block_size": 4}]))
    a = json.loads(CliRunner().invoke(main, ["audit", str(output), "--json"]).output)
    assert a["speedup_over_ar"]["speedup"] == 2.5


def test_a_folder_without_outputs_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["audit", str(tmp_path)])
    assert result.exit_code == 1 and "not a job output" in result.output
