"""Prompts longer than the model: the job past the context is refused, a row past it is a dead letter."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from job_helpers import completions, dead_letters, job_spec, job_stats, write_prompts

from dflash_batch.decoder import render_row
from dflash_batch.pipeline import JobRefused, build, job_config, shared_tokenizer
from dflash_batch.pipeline._tokenize import prepare_row

CONTEXT = 40


@pytest.fixture
def short_model(chat_model_dir, tmp_path):
    """The tiny chat model, told its context is CONTEXT positions."""
    folder = tmp_path / "short-model"
    shutil.copytree(chat_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    return folder


def test_a_job_whose_buckets_pass_the_context_is_refused_naming_the_setting(short_model, tmp_path):
    inputs = write_prompts(tmp_path / "in" / "p.parquet", [{"id": "a", "prompt": "hi"}])
    with pytest.raises(JobRefused) as refused:  # bucket 64 + max_new_tokens 8 > 40
        build(job_spec(short_model, inputs, tmp_path / "out", prompt_buckets=[16, 64]))
    assert refused.value.field == "decode.prompt_buckets"
    assert "64 + decode.max_new_tokens 8 = 72" in str(refused.value) and f"context of {CONTEXT}" in str(refused.value)
    assert "drop the buckets above 16" in str(refused.value)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_prompts_past_the_largest_fitting_bucket_are_dead_letters_with_the_numbers(short_model, tmp_path):
    long_prompt = " ".join(["summarize the quick brown fox results"] * 12)
    inputs = write_prompts(tmp_path / "in" / "p.parquet",
                           [{"id": "short", "prompt": "the quick fox"}, {"id": "long", "prompt": long_prompt}])
    out = tmp_path / "out"
    build(job_spec(short_model, inputs, out, prompt_buckets=[16, 32])).run()
    assert [r["id"] for r in completions(out)] == ["short"]
    [dead] = dead_letters(out)
    assert (dead["id"], dead["kind"]) == ("long", "prompt_too_long")
    assert f"+ max_new_tokens 8 = 248, more than the model's context of {CONTEXT} tokens" in dead["error"]
    assert job_stats(out)["dead_letters_by_kind"] == {"prompt_too_long": 1}


def test_a_row_past_the_context_is_refused_with_its_numbers(chat_model_dir, tmp_path):
    """The per-row check, for a decoder whose context is below its largest bucket (e.g. a bench)."""
    spec = job_spec(chat_model_dir, tmp_path / "in", tmp_path / "out", prompt_buckets=[16, 64])
    from apache_beam.options.pipeline_options import PipelineOptions

    config = dataclasses.replace(job_config(spec, PipelineOptions([])), context_tokens=20)
    tokenizer, _ = shared_tokenizer(str(chat_model_dir))
    row = {"id": "x", "prompt": "the quick brown fox jumps over the lazy dog and the quick brown fox"}
    kind, reason = prepare_row(tokenizer, row, "f", config)
    n = len(render_row(tokenizer, row, "none"))
    assert kind == "prompt_too_long"
    assert f"prompt is {n} tokens + max_new_tokens 8 = {n + 8}, more than the model's context of 20" in reason
    ok = prepare_row(tokenizer, {"id": "y", "prompt": "fox"}, "f", config)
    assert not isinstance(ok, tuple)


def test_a_prompt_that_fits_the_context_but_no_bucket_names_the_bucket_setting(chat_model_dir, tmp_path):
    spec = job_spec(chat_model_dir, tmp_path / "in", tmp_path / "out", prompt_buckets=[16])
    from apache_beam.options.pipeline_options import PipelineOptions

    config = dataclasses.replace(job_config(spec, PipelineOptions([])), context_tokens=512)
    tokenizer, _ = shared_tokenizer(str(chat_model_dir))
    row = {"id": "x", "prompt": " ".join(["the quick brown fox jumps over the lazy dog"] * 3)}
    kind, reason = prepare_row(tokenizer, row, "f", config)
    assert kind == "prompt_too_long" and "longer than the largest bucket (16)" in reason
    assert "decode.prompt_buckets" in reason


def test_truncate_left_cuts_the_start_of_a_long_prompt_and_records_it(short_model, tmp_path):
    long_prompt = " ".join(["summarize the quick brown fox results"] * 12)
    inputs = write_prompts(tmp_path / "in" / "p.parquet",
                           [{"id": "short", "prompt": "the quick fox"}, {"id": "long", "prompt": long_prompt}])
    out = tmp_path / "out"
    build(job_spec(short_model, inputs, out, prompt_buckets=[16, 32], truncate="left")).run()
    rows = {r["id"]: r for r in completions(out)}
    assert not dead_letters(out)
    assert rows["long"]["prompt_tokens"] == 32  # the largest bucket; 32 + 8 new tokens fit the context of 40
    assert rows["long"]["prompt_truncated_tokens"] == 240 - 32 and rows["short"]["prompt_truncated_tokens"] == 0


def test_truncate_is_one_of_its_choices(chat_model_dir, tmp_path):
    from dflash_batch.jobs._spec import SpecError

    with pytest.raises(SpecError, match="prompt.truncate"):
        job_spec(chat_model_dir, tmp_path / "in", tmp_path / "out", truncate="right")
