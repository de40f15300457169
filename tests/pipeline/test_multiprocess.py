"""Multi-process DirectRunner: the same output as in-process, and one model load per worker process."""

from __future__ import annotations

import collections
import os

import pytest
from job_helpers import completions, job_spec, job_stats, sentence, stable, write_prompts

from dflash_batch.pipeline import build

pytestmark = pytest.mark.slow


def test_multi_processing_matches_in_process_and_loads_once_per_process(chat_model_dir, tmp_path):
    rows = [{"id": f"r{i:02d}", "prompt": sentence(i), "temperature": 0.8 if i % 3 == 0 else None,
             "seed": i if i % 6 == 0 else None} for i in range(24)]
    inputs = write_prompts(tmp_path / "in" / "p.parquet", rows)
    flags = {"rows_per_batch": 2, "shards_per_bucket": 2}

    build(job_spec(chat_model_dir, inputs, tmp_path / "inproc", **flags)).run()
    multi = build(job_spec(chat_model_dir, inputs, tmp_path / "multi", **flags,
                           direct_running_mode="multi_processing", direct_num_workers=2)).run()

    assert stable(completions(tmp_path / "multi")) == stable(completions(tmp_path / "inproc"))
    workers = {r["worker"] for r in completions(tmp_path / "multi")}
    assert all(not w.endswith(f":{os.getpid()}") for w in workers)  # decoded in worker processes
    batches = multi.metrics["batch_rows"]["count"]
    loads = multi.metrics["model_loads"]
    assert batches >= 12 > loads  # many batches ...
    assert loads == len(workers) == 2  # ... and one model load per process, both of which decoded
    shares = collections.Counter(r["worker"] for r in completions(tmp_path / "multi"))
    assert min(shares.values()) >= 0.3 * len(rows), shares  # a fair share each
    assert job_stats(tmp_path / "multi")["model_loads"] == loads
