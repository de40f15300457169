"""The device training recipe at tiny shapes: every stage resumes, and the results come back in parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from xla_test_flags import xla_flags

from dflash_batch.decoder import summarize_messages

SCRIPT = Path(__file__).parents[2] / "tools" / "train_drafter_device.sh"
DOCS = ["The quick brown fox jumps over the lazy dog.", "We propose a new method for abstractive summarization.",
        "Results show large gains on two benchmarks, and the code is released.",
        "Prompts, completions and dead letters are written as Parquet files."]


def _prompts(path: Path, n: int, prefix: str) -> None:
    rows = [{"id": f"{prefix}{i}", "messages": summarize_messages(f"{DOCS[i % 4]} {DOCS[(i + 1) % 4]}")}
            for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.slow
@pytest.mark.minutes
def test_device_recipe_resumes_every_stage(tmp_path):
    from tiny_chat_model import make_tiny_chat_checkpoint

    model = make_tiny_chat_checkpoint(tmp_path / "model")
    work, results = tmp_path / "work", tmp_path / "results"
    work.mkdir()
    _prompts(work / "prompts.parquet", 12, "p")  # present: the prompt stage keeps them
    _prompts(work / "test-prompts.parquet", 2, "t")
    env = dict(os.environ, PY=sys.executable, TARGET=str(model), WORK=str(work), RESULTS=str(results),
               STEPS="4", BATCH="2", ANCHORS="4", LAYERS="1", TARGET_LAYERS="0,1", DRAFT_VOCAB="0", GEN_BATCH="4",
               MAX_NEW="8", EVAL_PROMPTS="2", EVAL_EVERY="0", CKPT="1", TEST_LIMIT="2", TEST_MAX_NEW="8",
               BUDGET="3000", GEN_BUDGET="2000", EVAL_RESERVE="10", XLA_FLAGS=xla_flags(1))

    def run(*extra):
        r = subprocess.run(["bash", str(SCRIPT), *extra], env=env, capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return json.loads((work / "summary.json").read_text())

    first = run("--stop-at", "2")  # a call that ends early (as a budget or a kill would)
    assert first["step"] == 2 and not first["finished"] and first["online"]
    assert "test" not in first  # unfinished and not stopped by the budget: no test tau yet
    responses = (work / "responses.jsonl").read_text()
    assert len(responses.splitlines()) == 12
    prompts_mtime = (work / "prompts.parquet").stat().st_mtime_ns

    second = run()
    assert second["step"] == 4 and second["finished"]
    assert (work / "responses.jsonl").read_text() == responses  # nothing generated again
    assert (work / "prompts.parquet").stat().st_mtime_ns == prompts_mtime
    history = json.loads((work / "checkpoint" / "meta.json").read_text())["history"]
    assert [h["step"] for h in history] == [2, 4]  # the second call continued the first one's run
    assert {"dflash_b16", "ngram_b16", "hybrid_b16"} <= set(second["test"])
    eval_record = (work / "test-eval.json").read_text()

    third = run()  # all done: every stage is skipped, the results are written again
    assert third["step"] == 4 and (work / "test-eval.json").read_text() == eval_record
    parts = sorted(results.glob("model.safetensors.part-*"))
    assert parts and b"".join(p.read_bytes() for p in parts) == (work / "drafter" / "model.safetensors").read_bytes()
    card = (results / "README.md").read_text()
    assert "computed online" in card and "ngram_b16" in card
