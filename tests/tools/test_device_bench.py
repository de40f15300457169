"""The bench where Beam is not installed: the same rounds on a Parquet file's prompts, a budget between batch sizes."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dflash_batch.decoder import summarize_messages


@pytest.mark.slow
def test_device_bench_writes_each_batch_size_and_names_those_past_its_budget(tmp_path, capsys):
    import device_bench
    from tiny_chat_model import make_tiny_chat_checkpoint

    model = make_tiny_chat_checkpoint(tmp_path / "model")
    rows = [{"id": f"p{i}", "messages": summarize_messages(f"Document {i} says something new.")} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "prompts.parquet")
    common = ["--model", str(model), "--prompts", str(tmp_path / "prompts.parquet"), "--modes", "ngram",
              "--block-sizes", "4", "--no-auto", "--dtypes", "float32", "--max-new-tokens", "4",
              "--learning-rounds", "0"]
    assert device_bench.main([*common, "--batch-sizes", "2", "--out", str(tmp_path / "a")]) == 0
    bench = json.loads((tmp_path / "a" / "bench.json").read_text())
    assert [(r["batch_size"], r["mode"], r["block_size"]) for r in bench] == [(2, "ar", 1), (2, "ngram", 4)]
    assert all(r["identical_fraction"] == 1.0 and r["num_prompts"] == 3 for r in bench)
    assert "ngram" in (tmp_path / "a" / "bench.txt").read_text()

    assert device_bench.main([*common, "--batch-sizes", "2,1", "--budget", "1e-6", "--out", str(tmp_path / "b")]) == 0
    assert "skipped batch sizes (budget 0s spent): [2, 1]" in capsys.readouterr().out  # loading spent it
