"""The job spec: TOML + --set overrides, refused before any work with messages naming each field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dflash_batch.jobs._spec import JobSpec, SpecError, load_spec, parse_override

EXAMPLE = Path(__file__).resolve().parents[2] / "jobs" / "examples" / "aclsum_summarize.toml"

MINIMAL = """
name = "t"
input = "in/*.parquet"
output = "out"
[prompt]
template = "none"
"""


@pytest.fixture
def spec_file(tmp_path) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(MINIMAL)
    return path


def _problems(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(SpecError) as e:
        load_spec(path, overrides)
    return e.value.problems


def test_the_example_job_is_valid_and_runs_ar_on_the_default_model():
    spec = load_spec(EXAMPLE)
    assert (spec.model.target, spec.decode.mode, spec.prompt.template) == ("smollm2-135m-instruct", "hybrid", "summarize")
    assert spec.runner.name == "direct"


def test_defaults_fill_a_minimal_spec_and_paths_become_absolute(spec_file, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(spec_file)
    assert spec.input == str(tmp_path / "in" / "*.parquet") and spec.output == str(tmp_path / "out")
    assert (spec.decode.mode, spec.decode.temperature, spec.model.drafter) == ("ar", 0.0, "default")
    assert spec.model.dtype == "auto"


@pytest.mark.parametrize("dtype", ["auto", "bfloat16", "float32"])
def test_the_model_dtype_is_a_job_setting(spec_file, dtype):
    spec = load_spec(spec_file, [f"model.dtype={dtype}"])
    assert spec.model.dtype == dtype
    assert f'"dtype": "{dtype}"' in spec.to_json()  # job_stats' spec_json keeps it


@pytest.mark.parametrize("override, message", [
    ("decode.batch_size=0", "decode.batch_size must be a positive integer, got 0"),
    ("decode.block_size=big", "decode.block_size must be 'auto' or a positive integer, got 'big'"),
    ("decode.batch_size=true", "decode.batch_size must be a positive integer, got true"),
    ("decode.batch_size=2.5", "decode.batch_size must be a positive integer, got 2.5"),
    ("decode.max_new_tokens=-1", "decode.max_new_tokens must be a positive integer, got -1"),
    ("decode.mode=fast", "decode.mode must be one of ar/dflash/ngram/hybrid, got 'fast'"),
    ("decode.temperature=-0.5", "decode.temperature must be a number >= 0, got -0.5"),
    ("decode.top_p=0", "decode.top_p must be a number in (0, 1], got 0"),
    ("decode.seed=x", "decode.seed must be an integer (int64), got 'x'"),
    ("decode.prompt_buckets=[128, 64]", "decode.prompt_buckets must be a non-empty list of increasing positive "
                                        "integers, got [128, 64]"),
    ("decode.prompt_buckets=64", "decode.prompt_buckets must be a non-empty list of increasing positive "
                                 "integers, got 64"),
    ("decode.chunk_steps=0", "decode.chunk_steps must be a positive integer, got 0"),
    ("decode.prefill_chunk=big", "decode.prefill_chunk must be a positive integer, got 'big'"),
    ("prompt.template=chat", "prompt.template must be one of none/summarize, got 'chat'"),
    ("name=my job", "name must be 1-100 letters, digits, '.', '_' or '-' (starting with a letter or digit), "
                    "got 'my job'"),
    ("output=out/*", "output must be a folder or gs:// prefix, not a pattern, got 'out/*'"),
    ("model.target=", "model.target must be a non-empty string, got ''"),
    ("model.dtype=fp16", "model.dtype must be one of auto/bfloat16/float32, got 'fp16'"),
    ("model.dtype=16", "model.dtype must be one of auto/bfloat16/float32, got 16"),
    ("runner.direct_running_mode=fork", "runner.direct_running_mode must be one of in_memory/multi_threading/"
                                        "multi_processing, got 'fork'"),
    ("runner.direct_num_workers=0", "runner.direct_num_workers must be a positive integer, got 0"),
    ("runner.max_workers=0", "runner.max_workers must be a positive integer, got 0"),
    ("pipeline.rows_per_batch=-4", "pipeline.rows_per_batch must be an integer >= 0, got -4"),
    ("decode.batchsize=4", "unknown key decode.batchsize (did you mean 'batch_size'?)"),
    ("decoder.mode=ar", "unknown section [decoder] (did you mean 'decode'?)"),
])
def test_a_bad_value_is_refused_naming_its_field(spec_file, override, message):
    assert _problems(spec_file, override) == [message]


def test_the_decode_section_is_the_decoders_config_plus_sampling_defaults(spec_file):
    from dflash_batch.decoder import DecodeConfig

    decode = load_spec(spec_file, ["decode.chunk_steps=4"]).decode
    assert isinstance(decode, DecodeConfig)  # what a Decoder takes, as it is
    shared = {f.name: getattr(decode, f.name) for f in dataclasses.fields(DecodeConfig)}
    assert shared == {**dataclasses.asdict(DecodeConfig()), "chunk_steps": 4}  # the decoder's defaults
    assert (decode.temperature, decode.top_p, decode.seed) == (0.0, 1.0, 0)


def test_every_problem_is_listed_at_once(spec_file):
    with pytest.raises(SpecError) as e:
        load_spec(spec_file, ["decode.batch_size=0", "decode.top_p=2"])
    text = str(e.value)
    assert str(spec_file) in text
    assert "decode.batch_size must be a positive integer, got 0" in text and "decode.top_p" in text


def test_required_fields(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('input = "x"\n')
    assert _problems(path) == ["name is required", "output is required",
                               "prompt.template is required (one of none/summarize)"]


def test_cross_field_rules(spec_file):
    assert _problems(spec_file, "decode.mode=dflash", "model.drafter=none") == [
        "model.drafter must name a drafter (default, a folder or gs://) for decode.mode 'dflash', got 'none'"]
    assert _problems(spec_file, "decode.mode=hybrid", "model.drafter=none") == [
        "model.drafter must name a drafter (default, a folder or gs://) for decode.mode 'hybrid', got 'none'"]
    problems = _problems(spec_file, "runner.name=dataflow")
    assert "runner.project is required for runner.name 'dataflow'" in problems
    assert any(p.startswith("input must be a gs:// location") for p in problems)


def test_dataflow_keys_are_accepted_but_run_refuses_dataflow(spec_file):
    spec = load_spec(spec_file, ["runner.name=dataflow", "runner.project=p", "runner.region=us-central1",
                                 "runner.temp_location=gs://b/tmp", "input=gs://b/in/*.parquet",
                                 "output=gs://b/out", "runner.tpu_type=tpu-v5-lite-podslice",
                                 "runner.tpu_topology=1x1", "runner.max_workers=4"])
    assert (spec.runner.tpu_topology, spec.runner.max_workers) == ("1x1", 4)
    with pytest.raises(SpecError, match="runner.name 'dataflow' is not run locally"):
        spec.require_direct()


def test_a_file_that_is_not_toml_or_missing(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(SpecError, match=r"bad.toml is invalid: not valid TOML"):
        load_spec(bad)
    with pytest.raises(SpecError, match=r"does not exist"):
        load_spec(tmp_path / "missing.toml")


@pytest.mark.parametrize("text, expected", [
    ("decode.batch_size=4", ("decode", "batch_size", 4)),
    ("decode.temperature=0.7", ("decode", "temperature", 0.7)),
    ("decode.prompt_buckets=[64, 128]", ("decode", "prompt_buckets", [64, 128])),
    ("model.target=smollm2-135m-instruct", ("model", "target", "smollm2-135m-instruct")),
    ("output=gs://b/out dir", ("", "output", "gs://b/out dir")),
    ('prompt.instruction="a=b"', ("prompt", "instruction", "a=b")),
])
def test_overrides_read_toml_values_or_plain_strings(text, expected):
    assert parse_override(text) == expected


def test_an_override_without_a_value_is_refused():
    with pytest.raises(SpecError, match="must look like section.key=value"):
        parse_override("decode.batch_size")


def test_the_pipeline_config_holds_the_spec_and_what_it_derives(spec_file):
    from apache_beam.options.pipeline_options import PipelineOptions

    from dflash_batch.pipeline._config import job_config

    spec = load_spec(spec_file, ["decode.batch_size=4", "decode.temperature=0.5", "decode.prompt_buckets=[32, 96]",
                                 "prompt.template=summarize", "runner.direct_num_workers=3", "name=x.y"])
    config = job_config(spec, PipelineOptions(spec.beam_options()), "/tmp/p")
    d = config.spec.decode
    assert (d.batch_size, d.temperature, d.prompt_buckets) == (4, 0.5, (32, 96))
    # rows_per_batch 0: 4 per slot; shards_per_bucket 0: the runner's workers, from the spec's [runner]
    assert (config.spec.prompt.template, config.rows_per_batch, config.shards_per_bucket) == ("summarize", 16, 3)
    assert (config.spec.name, config.progress_dir, config.input) == ("x.y", "/tmp/p", spec.input)
    assert isinstance(spec, JobSpec) and '"batch_size": 4' in config.spec.to_json()
    assert d.block_size == "auto"
    eight = load_spec(spec_file, ["decode.mode=ngram", "decode.block_size=8"])
    assert job_config(eight, PipelineOptions(eight.beam_options())).spec.decode.block_size == 8


@pytest.mark.parametrize("override, problem", [
    ("decode.data_parallel=0", "decode.data_parallel must be 'auto' or a positive integer, got 0"),
    ("decode.tensor_parallel=two", "decode.tensor_parallel must be 'auto' or a positive integer, got 'two'"),
    ("decode.tensor_parallel=1.5", "decode.tensor_parallel must be 'auto' or a positive integer, got 1.5"),
])
def test_parallel_degrees_must_be_auto_or_positive(spec_file, override, problem):
    assert problem in _problems(spec_file, override)


def test_a_batch_that_data_parallel_does_not_divide_is_refused(spec_file):
    problems = _problems(spec_file, "decode.batch_size=6", "decode.data_parallel=4")
    assert any(p.startswith("decode.batch_size 6 is not divisible by decode.data_parallel 4") and "multiple of 4" in p
               for p in problems)


def test_parallel_degrees_reach_the_pipeline(spec_file):
    from apache_beam.options.pipeline_options import PipelineOptions

    from dflash_batch.pipeline import model_key
    from dflash_batch.pipeline._config import job_config

    spec = load_spec(spec_file, ["decode.data_parallel=2", "decode.tensor_parallel=3", "decode.batch_size=4"])
    key = model_key(job_config(spec, PipelineOptions(spec.beam_options())))
    assert (key.decode.data_parallel, key.decode.tensor_parallel) == (2, 3)
    default = load_spec(spec_file)
    key = model_key(job_config(default, PipelineOptions(default.beam_options())))
    assert (key.decode.data_parallel, key.decode.tensor_parallel) == ("auto", "auto")
