"""``dflash-batch submit``: Dataflow TPU settings checked, and a complete offline dry-run request."""

from __future__ import annotations

import json
import subprocess
import sys
import time
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


def create_job_request(text: str):
    """The file parsed strictly (unknown fields are errors) as the Dataflow API's CreateJobRequest."""
    from google.cloud.dataflow_v1beta3 import CreateJobRequest

    return CreateJobRequest.from_json(text, ignore_unknown_fields=False)


@pytest.mark.parametrize("tpu_type,topology,machine", [("tpu-v5-lite-podslice", "1x1", "ct5lp-hightpu-1t"),
                                                       ("tpu-v6e-slice", "2x2", "ct6e-standard-4t")])
def test_dry_run_writes_the_create_job_request_and_its_extras_beside_it(tmp_path, tpu_type, topology, machine):
    out = tmp_path / "request.json"
    result = CliRunner().invoke(main, ["submit", str(spec_file(tmp_path, tpu_type, topology, machine)), "--dry-run",
                                       "--request-file", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    request = create_job_request(out.read_text())
    assert (request.project_id, request.location, request.job.name) == ("proj", "us-central1", "tpu-job")
    env = json.loads(out.read_text())["job"]["environment"]
    assert env["serviceOptions"] == [f"worker_accelerator=type:{tpu_type};topology:{topology}"]
    pool = env["workerPools"][0]
    assert pool["machineType"] == machine and pool["diskSizeGb"] == 50
    assert pool["autoscalingSettings"]["maxNumWorkers"] == 2
    assert pool["workerHarnessContainerImage"] == IMAGE
    assert pool["sdkHarnessContainerImages"][0]["containerImage"] == IMAGE
    assert pool["sdkHarnessContainerImages"][0]["useSingleCorePerContainer"] is True  # one SDK process
    assert {"use_runner_v2", "no_use_multiple_sdk_containers"} <= set(env["experiments"])
    assert pool["numThreadsPerWorker"] == 2
    options = env["sdkPipelineOptions"]["options"]
    assert options["dry_run"] is False and options["no_auth"] is False  # what a real submit sends
    extras = json.loads((tmp_path / "request.extras.json").read_text())
    assert {"ReadPrompts", "Tokenize", "Bucket", "Batch", "Decode", "WriteDeadLetters", "WriteJobStats"} \
        <= set(extras["pipeline_step_names"])
    assert any(f["location"].endswith("/pipeline.pb") for f in extras["staged_files"])  # recorded, not uploaded


def _normalized(request_json: str) -> dict:
    """A request without what differs between two submissions of one job: Beam's per-submission
    time (in the request id and the staging and temp folders) and the staged pipeline's hash (its
    input list is read at submission; the dry run does not list gs://)."""
    import re

    text = re.sub(r"tpu-job\.\d+\.\d+", "tpu-job.TIME", request_json)
    job = json.loads(text)
    job["job"].pop("clientRequestId")
    job["job"]["environment"]["sdkPipelineOptions"]["options"].pop("pipelineProtoHash", None)
    return job


def test_the_dry_run_request_equals_the_one_submit_sends(tmp_path, monkeypatch):
    """The real submit, against a GCS emulator, with only the Dataflow API's create_job recorded."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from gcs_emulator import DEFAULT_BUCKET, start_gcs_emulator
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import dataflow_v1beta3, storage

    sent = []

    def create_job(self, request, **_kw):
        sent.append(dataflow_v1beta3.CreateJobRequest.to_json(request, use_integers_for_enums=False, indent=2,
                                                              sort_keys=True))
        return dataflow_v1beta3.Job(id="2026-12-04_00_00_00-1", name=request.job.name)

    monkeypatch.setattr(dataflow_v1beta3.JobsV1Beta3Client, "create_job", create_job)
    monkeypatch.setenv("DFLASH_BATCH_LEDGER", str(tmp_path / "ledger.sqlite"))
    b = DEFAULT_BUCKET
    spec = spec_file(tmp_path, "tpu-v5-lite-podslice", "2x2", "ct5lp-hightpu-4t", temp_location=f"gs://{b}/tmp",
                     staging_location=f"gs://{b}/staging")
    spec.write_text(spec.read_text().replace("gs://bkt/in/", f"gs://{b}/in/").replace("gs://bkt/out", f"gs://{b}/out"))
    with start_gcs_emulator() as host:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", host)
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([{"id": "a", "document": "Some text."}]), buf)
        storage.Client(credentials=AnonymousCredentials(), project="t").bucket(b).blob("in/p.parquet") \
            .upload_from_string(buf.getvalue())
        dry = CliRunner().invoke(main, ["submit", str(spec), "--dry-run", "--request-file", str(tmp_path / "r.json")])
        assert dry.exit_code == 0, dry.output
        real = CliRunner().invoke(main, ["submit", str(spec)])
        assert real.exit_code == 0, real.output
    assert "as Dataflow job 2026-12-04_00_00_00-1" in real.output
    assert len(sent) == 1
    assert _normalized((tmp_path / "r.json").read_text()) == _normalized(sent[0])


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
    assert "target config: known shape HuggingFaceTB/SmolLM2-135M-Instruct" in result.output
    assert "mesh: data 4 x model 1" in result.output and "of 32.00 GB per chip (90% usable): fits" in result.output


@pytest.mark.parametrize("override, field", [
    ("decode.batch_size=1000000", "decode.batch_size"),  # the KV cache alone outgrows a v5e chip: a smaller batch fits
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


# ---- planning a gs:// model offline -------------------------------------------------------------

QWEN3_8B = "gs://bkt/models/Qwen3-8B"
V5E_1X1 = ("tpu-v5-lite-podslice", "1x1", "ct5lp-hightpu-1t")
V5E_2X4 = ("tpu-v5-lite-podslice", "2x4", "ct5lp-hightpu-8t")

# Runs `dflash-batch submit ARGS` in a fresh Python whose sockets refuse every address but
# loopback and whose DNS refuses every name, recording each attempt in the file argv[1].
_OFFLINE = """
import json, socket, sys
attempts = []
real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
LOCAL = ("127.0.0.1", "::1", "localhost")
def connect(self, address):
    if isinstance(address, tuple) and address[0] not in LOCAL:
        attempts.append(f"connect {address[0]}:{address[1]}")
        raise OSError(101, "network blocked by the test")
    return real_connect(self, address)
def getaddrinfo(host, *args, **kwargs):
    if host not in LOCAL and host is not None:
        attempts.append(f"dns {host}")
        raise socket.gaierror(-3, "network blocked by the test")
    return real_getaddrinfo(host, *args, **kwargs)
socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
from dflash_batch.jobs.cli import main
try:
    main(sys.argv[2:])
finally:
    open(sys.argv[1], "w").write(json.dumps(attempts))
"""


def run_offline(tmp_path: Path, args: list[str]) -> tuple[subprocess.CompletedProcess, list[str], float]:
    attempts = tmp_path / "attempts.json"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-P", "-c", _OFFLINE, str(attempts), *args], capture_output=True,
                          text=True, timeout=600)
    return done, json.loads(attempts.read_text()), time.perf_counter() - t0


def test_dry_run_of_a_gs_model_makes_no_network_call(tmp_path):
    spec = spec_file(tmp_path, *V5E_2X4)
    done, attempts, seconds = run_offline(tmp_path, ["submit", str(spec), "--set", f"model.target={QWEN3_8B}",
                                                     "--dry-run", "--request-file", str(tmp_path / "r.json")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert attempts == []
    assert "target config: known shape Qwen/Qwen3-8B (matched model.target 'gs://bkt/models/Qwen3-8B')" in done.stdout
    # dtype auto on TPU workers: bfloat16, where Qwen3-8B fits two chips per replica
    assert "mesh: data 4 x model 2" in done.stdout and ": fits" in done.stdout
    assert "weights in bfloat16, KV cache in bfloat16" in done.stdout
    create_job_request((tmp_path / "r.json").read_text())
    assert seconds < 120  # seconds, not the minutes of credential and GCS retries


@pytest.fixture
def no_build(monkeypatch):
    import dflash_batch.pipeline as pipeline

    monkeypatch.setattr(pipeline, "build", lambda *a, **k: pytest.fail("work started"))


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_gs_model_too_big_for_the_slice_is_refused_offline(tmp_path, no_build, dry_run):
    args = ["submit", str(spec_file(tmp_path, *V5E_1X1)), "--set", f"model.target={QWEN3_8B}",
            "--request-file", str(tmp_path / "r.json")] + (["--dry-run"] if dry_run else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "runner.tpu_topology: the model does not fit tpu-v5-lite-podslice 1x1" in result.output
    assert not (tmp_path / "r.json").exists()


def test_a_gs_model_of_unknown_shape_is_refused_naming_the_way_out(tmp_path, no_build):
    args = ["submit", str(spec_file(tmp_path, *V5E_1X1)), "--set", "model.target=gs://bkt/models/my-finetune"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "model.target 'gs://bkt/models/my-finetune'" in result.output
    assert "--model-config PATH" in result.output and "--no-memory-check" in result.output


def test_a_local_config_plans_the_gs_model(tmp_path, no_build):
    """--model-config (or [model] config) gives the config.json: here a Qwen3-8B-shaped one with
    4 layers, which fits one v5e chip where the 36-layer model does not."""
    from dflash_batch.jobs._model_shapes import TARGETS

    small = tmp_path / "cfg"
    small.mkdir()
    (small / "config.json").write_text(json.dumps({**TARGETS["Qwen/Qwen3-8B"], "num_hidden_layers": 4}))
    spec = spec_file(tmp_path, *V5E_1X1)
    args = ["submit", str(spec), "--set", "model.target=gs://bkt/models/my-finetune", "--dry-run",
            "--request-file", str(tmp_path / "r.json")]
    with pytest.MonkeyPatch.context() as m:
        m.setattr("dflash_batch.jobs._submit._write_request", lambda spec, path: None)
        for extra in (["--model-config", str(small)], ["--set", f"model.config={small / 'config.json'}"]):
            result = CliRunner().invoke(main, args + extra)
            assert result.exit_code == 0, result.output
            assert f"target config: model.config = {small}" in result.output
            assert "mesh: data 1 x model 1" in result.output and ": fits" in result.output


def test_no_memory_check_is_explicit_and_printed(tmp_path, monkeypatch):
    monkeypatch.setattr("dflash_batch.jobs._submit._submit", lambda spec: print("SENT"))
    args = ["submit", str(spec_file(tmp_path, *V5E_1X1)), "--set", "model.target=gs://bkt/models/my-finetune",
            "--no-memory-check"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "memory plan on tpu-v5-lite-podslice 1x1: SKIPPED (--no-memory-check)" in result.output
    assert "SENT" in result.output


def test_the_known_smollm2_shape_is_the_imported_models(tmp_path):
    from dflash_batch.decoder import resolve_model_dir
    from dflash_batch.jobs._model_shapes import TARGETS

    imported = json.loads((resolve_model_dir("smollm2-135m-instruct") / "config.json").read_text())
    known = TARGETS["HuggingFaceTB/SmolLM2-135M-Instruct"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "vocab_size", "tie_word_embeddings", "rms_norm_eps", "rope_theta"):
        assert imported[key] == pytest.approx(known[key], rel=1e-6), key  # the GGUF stores eps in float32
    assert imported.get("head_dim", imported["hidden_size"] // imported["num_attention_heads"]) == known["head_dim"]


@pytest.mark.parametrize("name,value", [("python", "3.10"), ("beam", "2.60.0")])
def test_a_submitter_unlike_the_image_is_refused(tmp_path, monkeypatch, no_build, name, value):
    from dflash_batch.jobs import _image_versions

    recipe = _image_versions.recipe_versions()
    monkeypatch.setattr(_image_versions, "local_image_labels", lambda image: None)
    monkeypatch.setattr(_image_versions, "recipe_versions", lambda: {**recipe, name: value})
    result = CliRunner().invoke(main, ["submit", str(spec_file(tmp_path, *V5E_1X1)), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert f"runner.sdk_container_image: the image runs {name.capitalize()} {value}" in result.output
