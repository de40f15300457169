"""``dflash-batch submit``: Dataflow TPU settings checked, and a complete offline dry-run request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dflash_batch.jobs.cli import main

IMAGE = "us-docker.pkg.dev/proj/dflash/worker:1"


def spec_file(tmp_path: Path, tpu_type: str, topology: str, machine: str, **runner) -> Path:
    values = {"project": "proj", "region": "us-central1", "temp_location": "gs://bkt/tmp",
              "staging_location": "gs://bkt/staging", "tpu_type": tpu_type, "tpu_topology": topology,
              "machine_type": machine, "sdk_container_image": IMAGE, "disk_size_gb": 50, "max_workers": 2, **runner}
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None)
    path = tmp_path / "job.toml"
    path.write_text(f"""name = "tpu-job"
input = "gs://bkt/in/*.parquet"
output = "gs://bkt/out"
[prompt]
template = "summarize"
[runner]
{table}
""")
    return path


@pytest.mark.parametrize("tpu_type,topology,machine", [("tpu-v5-lite-podslice", "1x1", "ct5lp-hightpu-1t"),
                                                       ("tpu-v6e-slice", "2x2", "ct6e-standard-4t")])
def test_dry_run_writes_the_complete_request(tmp_path, tpu_type, topology, machine):
    out = tmp_path / "request.json"
    result = CliRunner().invoke(main, ["submit", str(spec_file(tmp_path, tpu_type, topology, machine)), "--dry-run",
                                       "--request-file", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    req = json.loads(out.read_text())
    env = req["job"]["environment"]
    assert env["serviceOptions"] == [f"worker_accelerator=type:{tpu_type};topology:{topology}"]
    pool = env["workerPools"][0]
    assert pool["machineType"] == machine and pool["diskSizeGb"] == 50
    assert pool["autoscalingSettings"]["maxNumWorkers"] == 2
    assert pool["workerHarnessContainerImage"] == IMAGE
    assert pool["sdkHarnessContainerImages"][0]["containerImage"] == IMAGE
    assert pool["sdkHarnessContainerImages"][0]["useSingleCorePerContainer"] is True  # one SDK process
    assert {"use_runner_v2", "no_use_multiple_sdk_containers"} <= set(env["experiments"])
    assert pool["numThreadsPerWorker"] == 2
    assert req["project_id"] == "proj" and req["location"] == "us-central1"
    assert {"ReadPrompts", "Tokenize", "Bucket", "Batch", "Decode", "WriteCompletions", "WriteJobStats"} \
        <= set(req["pipeline_step_names"])
    assert any(f["location"].endswith("/pipeline.pb") for f in req["staged_files"])  # recorded, not uploaded


@pytest.mark.parametrize("runner,override,field", [
    ({}, "runner.machine_type=ct5lp-hightpu-4t", "runner.machine_type must be 'ct5lp-hightpu-1t'"),
    ({}, "output=/tmp/local-out", "output must be a gs:// location"),
    ({}, "input=prompts/*.parquet", "input must be a gs:// location"),
    ({}, "runner.staging_location=/tmp/staging", "runner.staging_location must be a gs:// location"),
    ({"temp_location": None}, None, "runner.temp_location is required"),
    ({}, "model.target=/models/local", "model.target must be a gs:// prefix or a registered name"),
])
def test_refused_specs_exit_2_naming_the_field(tmp_path, runner, override, field, monkeypatch):
    import dflash_batch.pipeline as pipeline

    monkeypatch.setattr(pipeline, "build", lambda *a, **k: pytest.fail("work started"))
    args = ["submit", str(spec_file(tmp_path, "tpu-v5-lite-podslice", "1x1", "ct5lp-hightpu-1t", **runner)),
            "--dry-run", "--request-file", str(tmp_path / "r.json")]
    if override:
        args += ["--set", override]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert field in result.output
    assert not (tmp_path / "r.json").exists()


def test_dry_run_prints_the_memory_plan_of_the_topology(tmp_path):
    args = ["submit", str(spec_file(tmp_path, "tpu-v6e-slice", "2x2", "ct6e-standard-4t")), "--dry-run",
            "--request-file", str(tmp_path / "r.json"), "--set", "decode.batch_size=8"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "memory plan on tpu-v6e-slice 2x2:" in result.output
    assert "mesh: data 4 x model 1" in result.output and "of 32.00 GB per chip (90% usable): fits" in result.output


@pytest.mark.parametrize("override, field", [
    ("decode.batch_size=1000000", "runner.tpu_topology"),  # the KV cache alone outgrows a v5e chip
    ("decode.tensor_parallel=2", "decode.tensor_parallel"),  # SmolLM2's 9 query heads
    ("decode.data_parallel=2", "decode.data_parallel"),  # a 1x1 slice has one chip
])
def test_a_job_that_cannot_fit_the_slice_exits_2_naming_the_setting(tmp_path, override, field, monkeypatch):
    import dflash_batch.pipeline as pipeline

    monkeypatch.setattr(pipeline, "build", lambda *a, **k: pytest.fail("work started"))
    args = ["submit", str(spec_file(tmp_path, "tpu-v5-lite-podslice", "1x1", "ct5lp-hightpu-1t")), "--dry-run",
            "--request-file", str(tmp_path / "r.json"), "--set", override]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert field in result.output
    assert not (tmp_path / "r.json").exists()
