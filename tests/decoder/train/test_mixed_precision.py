"""Mixed-precision training: a bf16 target trains the drafter in bf16 on float32 master
weights, and the tau reported during training is that of the drafter as shipped (bf16)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_training import SPEC, TRAIN

from dflash_batch.decoder.train import (Sample, Trainer, TokenSequences, drafter_config, init_params)
from dflash_batch.decoder.train._loop import cast_floats
from dflash_batch.decoder.train._run import SHIP_DTYPE, as_shipped


def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in v if isinstance(v, tuple) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


@pytest.fixture(scope="module")
def setup(tiny32):
    rng = np.random.default_rng(0)
    vocab = tiny32.config.vocab_size
    samples = [Sample(f"s{i}", rng.integers(3, vocab, 6).astype(np.int32), rng.integers(3, vocab, 20).astype(np.int32),
                      "length") for i in range(4)]
    spec = dataclasses.replace(SPEC, draft_vocab_size=None)
    dcfg = drafter_config(spec, tiny32)
    inv = np.ones((dcfg.num_features, dcfg.hidden_size), np.float32)
    bf16_target = cast_floats(tiny32.params, jnp.bfloat16)
    cfg16 = dataclasses.replace(tiny32.config, dtype="bfloat16")
    tcfg = dataclasses.replace(TRAIN, batch_size=4, top_k=8)
    trainer = Trainer(dcfg, bf16_target, TokenSequences.from_samples(samples), tcfg, inv_scale=inv, t2d=None,
                      target_config=cfg16)
    params = init_params(dcfg, tiny32.params, tiny32.config, jax.random.PRNGKey(0), inv_scale=inv)
    return trainer, params


@pytest.mark.slow
def test_a_bf16_target_trains_in_bf16_on_float32_masters(setup):
    trainer, params = setup
    assert trainer.compute_dtype == jnp.bfloat16
    batch = trainer.batch(np.arange(4), np.random.default_rng(1))
    # the forward's matmuls take bf16 operands ...
    jaxpr = jax.make_jaxpr(lambda p: trainer.loss(p, batch)[0])(params).jaxpr
    dots = [e for e in _eqns(jaxpr) if e.primitive.name == "dot_general"]
    draft_dots = [e for e in dots if e.invars[1].aval.shape[-1] == trainer.dcfg.hidden_size]  # fc, o, down
    assert draft_dots and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in draft_dots)
    # ... while the parameters, their updates and the optimiser state stay float32
    copy = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
    opt = trainer.init_opt(copy)
    new, opt, metrics = trainer.step(copy, opt, batch)
    new, opt, metrics = trainer.step(new, opt, batch)  # the first step's learning rate is 0 (warmup)
    assert {a.dtype for a in jax.tree.leaves(new)} == {jnp.dtype(jnp.float32)}
    assert {a.dtype for a in jax.tree.leaves(opt) if jnp.issubdtype(a.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params))]
    assert max(moved) > 0


def test_the_evaluated_drafter_is_the_shipped_one(setup, tiny32):
    """Weights rounded to the shipped dtype, run in the target's dtype: what a job loads."""
    trainer, params = setup
    drafter = as_shipped(trainer.dcfg, params, "float32")
    assert drafter.config.dtype == "float32"
    want = jax.tree.map(lambda a: np.asarray(a.astype(SHIP_DTYPE).astype(jnp.float32)), params)
    jax.tree.map(lambda w, g: np.testing.assert_array_equal(np.asarray(g), w), want, drafter.params)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(drafter.params), jax.tree.leaves(params)))  # rounding did something
