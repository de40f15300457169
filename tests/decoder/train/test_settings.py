"""The training settings check themselves, each problem naming its field."""

from __future__ import annotations

import dataclasses

import pytest

from dflash_batch.decoder.train import DataConfig, DrafterSpec, SettingsError, TrainConfig


def test_bad_settings_are_refused_with_every_field_named():
    with pytest.raises(SettingsError) as e:
        TrainConfig(steps=0, warmup=1.0, distill=1.5, teacher="soft", gamma=0.0)
    for text in ("steps must be >= 1, got 0", "warmup must be < 1", "distill must be <= 1", "teacher must be one of",
                 "gamma must be > 0"):
        assert text in str(e.value)
    with pytest.raises(SettingsError, match="block_size must be >= 2"):
        DrafterSpec(block_size=1)
    with pytest.raises(SettingsError, match="gen_mode must be one of ar/ngram, got 'dflash'"):
        DataConfig(gen_mode="dflash")


def test_none_keeps_its_documented_meaning_and_the_edges_are_allowed():
    assert DrafterSpec(draft_vocab_size=None, target_layer_ids=None).draft_vocab_size is None
    assert TrainConfig(warmup=0.0, distill=1.0, eval_every=0).distill == 1.0


@pytest.mark.parametrize("cls", [DrafterSpec, TrainConfig, DataConfig])
def test_every_field_says_what_it_does(cls):
    for field in dataclasses.fields(cls):
        assert field.metadata.get("help", "").strip(), f"{cls.__name__}.{field.name} has no help"
