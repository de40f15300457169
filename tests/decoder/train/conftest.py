"""One tiny end-to-end training run, shared by the trainer tests (JAX compiles stay few)."""

from __future__ import annotations

import pytest
from tiny_training import N_HELD_OUT, SPEC, TRAIN, VOCAB, tiny_prompts


@pytest.fixture(scope="session")
def tiny32(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    from dflash_batch.decoder import load_target

    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama-v32"), "llama", seed=0, vocab_size=VOCAB)
    return load_target(str(folder), with_tokenizer=False)


@pytest.fixture(scope="session")
def tiny_run(tiny32, tmp_path_factory):
    """Trains a drafter on the tiny target's own greedy responses to random prompts
    (some held out for evaluation) and returns (summary, out_dir, work_dir)."""
    from dflash_batch.decoder.train import DataConfig, train_drafter

    root = tmp_path_factory.mktemp("tiny-run")
    data = DataConfig(max_new_tokens=32, eval_prompts=N_HELD_OUT, eval_max_new_tokens=32)
    summary = train_drafter(tiny32, tiny_prompts(), root / "drafter", work_dir=root / "work", spec=SPEC, tcfg=TRAIN,
                            data=data, progress=False, log=lambda _: None)
    return summary, root / "drafter", root / "work"
