"""Running a Pallas attention kernel on a device mesh.

XLA cannot split a Pallas call across devices; inside a jit over a ``('data', 'model')`` mesh
it would gather every operand onto each device. So where a mesh is active (the decoder's
``_mesh.active``) the kernel runs under ``jax.shard_map``: each device attends its own rows
(batch over ``data``) and its own kv heads with their query groups (over ``model``), which
is all attention needs, as heads never mix inside it. An axis the mesh does not divide (a
one-row prefill chunk on several replicas) stays whole on every device.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXIS, HEAD_AXIS = "data", "model"


def _mesh():
    m = jax.sharding.get_abstract_mesh()
    if m is None or m.empty or BATCH_AXIS not in m.axis_names or HEAD_AXIS not in m.axis_names:
        return None
    return m


def on_mesh(kernel: Callable, q, k_cache, v_cache, lengths, k_new, v_new, cache_layout: str):
    """``kernel(q, k_cache, v_cache, lengths, k_new, v_new)`` per device under the active mesh, or
    as is on one device. q [B, T, K, G, H]; caches [B, K, S, H] (BKSH) or [B, S, K, H] (BSKH);
    lengths [B]; k/v new [B, T, K, H]."""
    mesh = _mesh()
    if mesh is None or mesh.size == 1:
        return kernel(q, k_cache, v_cache, lengths, k_new, v_new)
    b = BATCH_AXIS if q.shape[0] % mesh.shape[BATCH_AXIS] == 0 else None
    k = HEAD_AXIS if q.shape[2] % mesh.shape[HEAD_AXIS] == 0 else None
    cache = P(b, k, None, None) if cache_layout == "BKSH" else P(b, None, k, None)
    block = P(b, None, k, None)
    out = P(b, None, k, None, None)
    return jax.shard_map(kernel, in_specs=(out, cache, cache, P(b), block, block), out_specs=out,
                         check_vma=False)(q, k_cache, v_cache, lengths, k_new, v_new)
