"""The README's demo job on the default model (SmolLM2-135M-Instruct: 9 query heads, 3 kv heads)
over 6 simulated devices as data 2 x model 3 gives every row, equal to the job on one device.
Six rows of 48 new tokens: every data shard decodes rows, and the test stays minutes long."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dflash_batch.jobs.cli import main

EXAMPLE = Path(__file__).resolve().parents[3] / "jobs" / "examples" / "aclsum_summarize.toml"


def _run(tmp_path: Path, name: str, data: int, model: int) -> tuple[dict, dict]:
    out = tmp_path / name
    result = CliRunner().invoke(main, ["run", str(EXAMPLE), "--no-progress", "--set", f"input={tmp_path}/in/*.parquet",
                                       "--set", f"output={out}", "--set", f"decode.data_parallel={data}",
                                       "--set", f"decode.tensor_parallel={model}", "--set", "decode.max_new_tokens=48",
                                       # One block length: the automatic choice's warmup would time
                                       # and compile up to four programs per run (minutes on 6
                                       # simulated devices); its parked state on a mesh is held to
                                       # its shards in tests/decoder/mesh.
                                       "--set", "decode.block_size=4"])
    assert result.exit_code == 0, result.output
    rows = {}
    for f in sorted(out.glob("completions-*.parquet")):
        for r in pq.read_table(f).to_pylist():
            rows[r["id"]] = r["completion_token_ids"]
    return rows, json.loads((out / "job_stats.json").read_text())


def test_demo_job_on_data_2_x_model_3_equals_one_device(tmp_path):
    if importlib.util.find_spec("aclsum") is None:
        pytest.skip("ACLSum data is not installed (pip install --no-deps aclsum==0.1.2)")
    made = CliRunner().invoke(main, ["make-example-input", str(tmp_path / "in" / "test-00000.parquet"),
                                     "--limit", "6"])
    assert made.exit_code == 0, made.output
    mesh_rows, mesh_stats = _run(tmp_path, "mesh", 2, 3)
    one_rows, one_stats = _run(tmp_path, "one", 1, 1)
    assert len(mesh_rows) == 6 and mesh_stats["dead_letters"] == 0
    assert mesh_stats["hardware"] == "cpu x6, data 2 x model 3"
    assert one_stats["hardware"] == "cpu x1, data 1 x model 1"
    assert mesh_rows == one_rows
    shutil.rmtree(tmp_path / "mesh")
