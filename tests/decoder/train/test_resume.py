"""Checkpoints: a resumed run continues the exact trajectory of one that never stopped."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from tiny_training import SPEC, TRAIN

from dflash_batch.decoder.train import (
    Trainer, drafter_config, feature_inv_scale, init_params, open_feature_cache, target_to_draft, train_loop,
)

N = 3  # steps before the interruption


@pytest.fixture(scope="module")
def setup(tiny32, tiny_run):
    """A trainer on the tiny run's feature cache, shared so the step compiles once."""
    _, _, work = tiny_run
    cache = open_feature_cache(work / "features")
    dcfg = drafter_config(SPEC, tiny32)
    tcfg = dataclasses.replace(TRAIN, steps=2 * N, checkpoint_every=N, eval_every=0, log_every=1, seed=3)
    inv = feature_inv_scale(cache.scale, True)
    d2t = np.arange(3, 3 + SPEC.draft_vocab_size, dtype=np.int32)
    trainer = Trainer(dcfg, tiny32.params, cache, tcfg, inv_scale=inv, t2d=target_to_draft(d2t, dcfg.vocab_size))

    def fresh():
        return init_params(dcfg, tiny32.params, tiny32.config, jax.random.PRNGKey(0), inv_scale=inv, d2t=d2t)

    return trainer, fresh, np.arange(len(cache) - 4)


def test_resumed_run_continues_the_same_trajectory(setup, tmp_path):
    trainer, fresh, seqs = setup
    ident = {"run": "resume-test"}
    whole = train_loop(trainer, fresh(), seqs, tmp_path / "a", resume=False, identity=ident, progress=False)
    first = train_loop(trainer, fresh(), seqs, tmp_path / "b", resume=False, identity=ident, stop_at=N,
                       progress=False)
    assert first.step == N and len(first.losses) == N
    rest = train_loop(trainer, fresh(), seqs, tmp_path / "b", resume=True, identity=ident, progress=False)
    assert rest.step == 2 * N
    assert first.losses + rest.losses == whole.losses  # bit-identical, step by step
    assert len(set(whole.losses)) == 2 * N  # the steps really differ (and so would a wrong resume)
    jax.tree.map(np.testing.assert_array_equal, rest.params, whole.params)
    assert [h["step"] for h in rest.meta["history"]] == list(range(1, 2 * N + 1))


def test_resume_refuses_other_settings_and_fresh_runs_refuse_to_overwrite(setup, tmp_path):
    trainer, fresh, seqs = setup
    train_loop(trainer, fresh(), seqs, tmp_path / "c", resume=False, identity={"lr": 1}, stop_at=1, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train_loop(trainer, fresh(), seqs, tmp_path / "c", resume=True, identity={"lr": 2}, progress=False)
    with pytest.raises(FileExistsError):
        train_loop(trainer, fresh(), seqs, tmp_path / "c", resume=False, identity={"lr": 1}, progress=False)
