"""The model's dtype as a job setting: loaded as asked, recorded everywhere, and a rerun under
another dtype refused, since the dtype changes completions."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import pytest
from job_helpers import completions, job_spec, job_stats, sentence, write_prompts

from dflash_batch.decoder._dtype import CPU_AUTO
from dflash_batch.pipeline import JobRefused, build
from dflash_batch.pipeline import _model


@pytest.fixture
def inputs(tmp_path):
    return write_prompts(tmp_path / "in" / "p.parquet", [{"id": f"r{i}", "prompt": sentence(i)} for i in range(3)])


def test_a_bfloat16_job_loads_bfloat16_weights_and_records_the_dtype(chat_model_dir, inputs, tmp_path):
    out = tmp_path / "out"
    built = build(job_spec(chat_model_dir, inputs, out, dtype="bfloat16"))
    result = built.run()
    model, _ = _model.shared_model(_model.ModelKey(model=str(chat_model_dir), drafter=None,
                                                   decode=built.config.spec.decode, dtype="bfloat16"))
    assert {leaf.dtype for leaf in _leaves(model.decoder.target.params)} == {jnp.dtype(jnp.bfloat16)}
    rows = completions(out)
    assert len(rows) == 3 and {r["dtype"] for r in rows} == {"bfloat16"}
    assert result.stats["dtype"] == job_stats(out)["dtype"] == "bfloat16"
    assert json.loads((out / "job_manifest.json").read_text())["dtype"] == "bfloat16"


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_a_rerun_under_another_dtype_is_refused_like_a_model_change(chat_model_dir, inputs, tmp_path):
    out = tmp_path / "out"
    build(job_spec(chat_model_dir, inputs, out, dtype="bfloat16")).prepare_output()
    with pytest.raises(JobRefused) as e:
        build(job_spec(chat_model_dir, inputs, out, dtype="float32"))
    assert e.value.field == "output" and "dtype 'bfloat16' -> 'float32'" in e.value.reason
    build(job_spec(chat_model_dir, inputs, out, dtype="bfloat16"))  # the same dtype may rerun


def test_auto_is_recorded_as_the_dtype_it_resolves_to(chat_model_dir, inputs, tmp_path):
    """On this CPU "auto" and CPU_AUTO make the same completions: a rerun may switch between them."""
    out = tmp_path / "out"
    built = build(job_spec(chat_model_dir, inputs, out))  # dtype "auto", the default
    assert built.config.spec.model.dtype == "auto" and built.config.dtype == CPU_AUTO
    assert built.config.rows_in == 3  # the preflight's count: the most a worker's lazy compile can pay back over
    built.prepare_output()
    assert json.loads((out / "job_manifest.json").read_text())["dtype"] == CPU_AUTO
    build(job_spec(chat_model_dir, inputs, out, dtype=CPU_AUTO))
    other = "bfloat16" if CPU_AUTO == "float32" else "float32"
    with pytest.raises(JobRefused, match=f"dtype '{CPU_AUTO}' -> '{other}'"):
        build(job_spec(chat_model_dir, inputs, out, dtype=other))


def test_an_output_from_before_the_dtype_setting_counts_as_float32(chat_model_dir, inputs, tmp_path):
    out = tmp_path / "out"
    build(job_spec(chat_model_dir, inputs, out, dtype="float32")).prepare_output()
    manifest = json.loads((out / "job_manifest.json").read_text())
    del manifest["dtype"]
    (out / "job_manifest.json").write_text(json.dumps(manifest))
    build(job_spec(chat_model_dir, inputs, out, dtype="float32"))
    with pytest.raises(JobRefused, match="dtype 'float32' -> 'bfloat16'"):
        build(job_spec(chat_model_dir, inputs, out, dtype="bfloat16"))


def test_a_dataflow_job_resolves_auto_for_its_tpu_workers_not_for_the_submitting_machine(chat_model_dir):
    spec = job_spec(chat_model_dir, "in/*.parquet", "out")
    dataflow = dataclasses.replace(spec, runner=dataclasses.replace(spec.runner, name="dataflow"))
    checkpoint = json.loads((chat_model_dir / "config.json").read_text())
    assert _model.job_dtype(dataflow, checkpoint) == "bfloat16"
    assert _model.job_dtype(spec, checkpoint) == CPU_AUTO  # this machine: a CPU
    assert _model.job_dtype(dataclasses.replace(dataflow, model=dataclasses.replace(dataflow.model, dtype="float32")),
                            checkpoint) == "float32"
