"""The Pallas kernels inside a jit over a mesh run per device under shard_map (interpret mode on
CPU) and equal the reference, including a one-row block the data axis cannot split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dflash_batch.kernels import draft_attention, reference_draft_attention, reference_verify_attention, \
    verify_attention


def _inputs(b, t=4, k=4, g=2, s=16, h=8, seed=0):
    r = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(r.normal(size=shape), jnp.float32)  # noqa: E731
    return (f(b, t, k, g, h), f(b, k, s, h), f(b, k, s, h), jnp.asarray(r.integers(0, s, size=b), jnp.int32),
            f(b, t, k, h), f(b, t, k, h))


@pytest.mark.parametrize("op, ref", [(verify_attention, reference_verify_attention),
                                     (draft_attention, reference_draft_attention)])
@pytest.mark.parametrize("batch", [4, 1])
def test_kernel_on_a_2x4_mesh_equals_the_reference(op, ref, batch):
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    args = _inputs(batch)
    want = ref(*args)
    row = "data" if batch % 2 == 0 else None
    specs = (P(row, None, "model", None, None), P(row, "model", None, None), P(row, "model", None, None), P(row),
             P(row, None, "model", None), P(row, None, "model", None))
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    with jax.set_mesh(mesh):
        got = jax.jit(lambda *a: op(*a, impl="interpret"))(*placed)
        text = jax.jit(lambda *a: op(*a, impl="interpret")).lower(*placed).as_text()
    assert "shard_map" in text or "sdy.manual_computation" in text
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
