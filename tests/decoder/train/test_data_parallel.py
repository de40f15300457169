"""Data-parallel training: one step over 4 devices equals one step on 1 device with the same global batch.

The 4 simulated CPU devices must exist before JAX starts, and the test session forces 1
(tests/conftest.py), so the 4-device test runs in its own pytest process.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny_training import SPEC, TRAIN
from xla_test_flags import xla_flags

from dflash_batch.decoder.train import (
    Sample, Trainer, TokenSequences, drafter_config, init_params, target_to_draft,
)

INNER = "DFLASH_TEST_DATA_PARALLEL_INNER"


@pytest.mark.slow
def test_four_devices_equal_one_device():
    env = dict(os.environ, XLA_FLAGS=xla_flags(4), **{INNER: "1"})
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"{__file__}::test_step_on_four_devices_equals_step_on_one"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


@pytest.mark.skipif(os.environ.get(INNER) != "1", reason="runs inside test_four_devices_equal_one_device")
def test_step_on_four_devices_equals_step_on_one(tiny32):
    assert jax.device_count() == 4
    rng = np.random.default_rng(1)
    vocab = tiny32.config.vocab_size
    samples = [Sample(f"s{i}", rng.integers(3, vocab, int(rng.integers(4, 12))).astype(np.int32),
                      rng.integers(3, vocab, int(rng.integers(10, 30))).astype(np.int32), "length") for i in range(8)]
    data = TokenSequences.from_samples(samples)
    dcfg = drafter_config(SPEC, tiny32)
    d2t = np.arange(3, 3 + SPEC.draft_vocab_size, dtype=np.int32)
    t2d = target_to_draft(d2t, dcfg.vocab_size)
    inv = np.ones((dcfg.num_features, dcfg.hidden_size), np.float32)
    tcfg = dataclasses.replace(TRAIN, batch_size=8, top_k=min(TRAIN.top_k, vocab))
    mesh4 = jax.make_mesh((4, 1), ("data", "model"))
    mesh1 = jax.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
    assert mesh4.shape["data"] == 4
    trainers = [Trainer(dcfg, tiny32.params, data, tcfg, inv_scale=inv, t2d=t2d, target_config=tiny32.config, mesh=m)
                for m in (mesh4, mesh1)]
    batch = trainers[0].batch(np.arange(8), np.random.default_rng(3))
    out = []
    for tr in trainers:
        params = tr.place(init_params(dcfg, tiny32.params, tiny32.config, jax.random.PRNGKey(0), inv_scale=inv,
                                      d2t=d2t))
        opt = tr.init_opt(params)
        for _ in range(2):  # two steps: the second also reads the optimiser state the first left
            params, opt, metrics = tr.step(params, opt, batch)
        out.append((params, metrics))
    (p4, m4), (p1, m1) = out
    assert len(p4["fc"].sharding.device_set) == 4 and len(p1["fc"].sharding.device_set) == 1
    for k in m1:
        np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=1e-5, err_msg=k)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6), p4, p1)


def test_batch_must_split_evenly_over_the_data_axis(tiny32):
    data = TokenSequences.from_samples([Sample("a", np.arange(3, 8, dtype=np.int32), np.arange(3, 9, dtype=np.int32),
                                               "length")])
    dcfg = drafter_config(SPEC, tiny32)

    class FakeMesh:  # only its shape is read before the check
        shape = {"data": 4}

    with pytest.raises(ValueError, match="multiple of the mesh's 4 data shards"):
        Trainer(dcfg, tiny32.params, data, dataclasses.replace(TRAIN, batch_size=6),
                inv_scale=np.ones((dcfg.num_features, dcfg.hidden_size), np.float32), t2d=None,
                target_config=tiny32.config, mesh=FakeMesh())
