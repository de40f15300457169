"""Binding a decode mode's jitted phases to their weights, on one device or on a mesh.

On one device the phases are called as they are. On a mesh each phase is wrapped in a jit
whose input and output shardings are the state's own (``_mesh.state_specs``), so that:
  * the slot state is created already sharded (``init_state`` is a jitted zeros function
    with ``out_shardings``): no host copy, and no chip holds a whole cache;
  * every call returns the state in the layout it came in, so nothing recompiles after
    warmup;
  * arrays the host puts into the state (the engine's edits of ``done``, ``pos``, ...) are
    moved into that layout on the way in (a no-op for the others), again without a new
    compilation.
The mesh is active while the phases trace, for sampling's sharding constraint and the
kernels' ``shard_map``.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from dflash_batch.decoder._engine import Phases
from dflash_batch.decoder._mesh import active, is_sharded, replicated, shardings, state_specs


def bind_phases(prefill: Callable, decode: Callable, init_state: Callable, params, drafter, mesh=None,
                **kw) -> Phases:
    """Phases with the weights bound.

    prefill(params, drafter, state, tokens, start, length, slot, budget, temperature, top_p, key) -> state
    decode(params, drafter, state, stop_on_first_done, max_steps, gate, block) -> (state, steps_run)
    ``kw``: the remaining ``Phases`` fields.
    """
    if not is_sharded(mesh):
        return Phases(
            prefill=lambda s, *args: prefill(params, drafter, s, *args),
            decode=lambda s, stop_first, block, n, gate: decode(params, drafter, s, stop_first, n, np.float32(gate),
                                                                block),
            init_state=init_state, **kw)
    state_sh = shardings(state_specs(jax.eval_shape(init_state)), mesh)
    p_sh = jax.tree.map(lambda a: a.sharding, params)
    d_sh = jax.tree.map(lambda a: a.sharding, drafter)
    rep = replicated(mesh)
    init_j = jax.jit(init_state, out_shardings=state_sh)
    prefill_j = jax.jit(prefill, donate_argnums=(2,), in_shardings=(p_sh, d_sh, state_sh) + (rep,) * 8,
                        out_shardings=state_sh)
    decode_j = jax.jit(decode, static_argnums=(6,), donate_argnums=(2,),
                       in_shardings=(p_sh, d_sh, state_sh, rep, rep, rep), out_shardings=(state_sh, rep))

    # Arrays the host put into the state are placed first: a traced call's cache key includes
    # its arguments' shardings, so an unplaced array would trace (and compile) it again.
    def run_prefill(s, *args):
        with active(mesh):
            return prefill_j(params, drafter, jax.device_put(s, state_sh), *args)

    def run_decode(s, stop_first, block, n, gate):
        with active(mesh):
            return decode_j(params, drafter, jax.device_put(s, state_sh), stop_first, n, np.float32(gate), block)

    def run_init():
        with active(mesh):
            return init_j()

    return Phases(prefill=run_prefill, decode=run_decode, init_state=run_init, **kw)
