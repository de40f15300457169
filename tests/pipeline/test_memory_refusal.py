"""A job whose memory plan does not fit its TPU slice is refused naming every job-spec field whose
change would fit, before anything loads (only the model's config.json is read)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from job_helpers import job_spec
from dflash_batch.decoder import HBM_PER_CHIP
from dflash_batch.pipeline import JobRefused, check_layout, job_config

# Qwen3-8B's config.json, as far as the plan reads it.
QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096,
            "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False, "max_position_embeddings": 40960, "eos_token_id": 151645}

# A z-lab format block-16 drafter for it, 5 layers shaped like the target's.
DRAFTER = {"architectures": ["DFlashDraftModel"], "block_size": 16, "num_hidden_layers": 5,
           "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]},
           **{k: QWEN3_8B[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                       "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps")}}


@pytest.fixture
def qwen3_8b_job(tmp_path):
    for name, config in (("qwen3-8b", QWEN3_8B), ("drafter", DRAFTER)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    spec = job_spec(tmp_path / "qwen3-8b", tmp_path / "in.parquet", tmp_path / "out", mode="dflash",
                    drafter=tmp_path / "drafter", batch_size=64, max_new_tokens=1024,
                    prompt_buckets=[64, 128, 256, 512, 1024, 2048])
    return dataclasses.replace(job_config(spec, PipelineOptions([])), drafter=str(tmp_path / "drafter"))


def _on_v5e_8(config, dtype):
    return check_layout(config, 8, HBM_PER_CHIP["v5e"], where="tpu-v5-lite-podslice 2x4 (8 v5e chips)",
                        topology_field="runner.tpu_topology", dtype=dtype)


def test_qwen3_8b_fits_v5e_8_in_bfloat16(qwen3_8b_job):
    plan = _on_v5e_8(qwen3_8b_job, "bfloat16")
    assert plan.fits and plan.data * plan.model == 8 and plan.dtype == "bfloat16"


def test_qwen3_8b_in_float32_is_refused_naming_model_dtype_and_the_other_fields_that_would_fit(qwen3_8b_job):
    with pytest.raises(JobRefused) as e:
        _on_v5e_8(qwen3_8b_job, "float32")
    assert e.value.field == "model.dtype"
    message = str(e.value)
    assert message.startswith("model.dtype: the model does not fit tpu-v5-lite-podslice 2x4 (8 v5e chips) at "
                              "batch_size 64 in float32")
    for fits in ("model.dtype = bfloat16 (data", "decode.batch_size = 32", "decode.max_new_tokens = ",
                 "decode.prompt_buckets = [64, 128, 256, 512, 1024]", "a larger runner.tpu_topology"):
        assert fits in message
