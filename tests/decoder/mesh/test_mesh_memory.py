"""On a data 2 x model 2 mesh, each chip holds what the memory plan counts per chip.

Run by tests/test_simulated_devices.py in a process with 8 simulated devices.
"""

from __future__ import annotations

import gc

import jax
import numpy as np

from dflash_batch.decoder import DecodeConfig, Decoder, Request, load_target, make_mesh, plan
from tiny_models import make_tiny_checkpoint, random_drafter


def _bytes_on(device) -> int:
    """Bytes of the buffers alive on ``device``, each counted once (array objects may share one)."""
    buffers = {}
    for a in jax.live_arrays():
        if a.is_deleted():
            continue
        for shard in a.addressable_shards:
            if shard.device == device:
                data = shard.data
                buffers[data.unsafe_buffer_pointer()] = data.nbytes
                del data
    return sum(buffers.values())


def test_each_chip_holds_the_plans_bytes_after_two_buckets(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "wide", "llama", seed=3, num_attention_heads=8, num_key_value_heads=4)
    mesh = make_mesh(2, 2)
    device = mesh.devices[1, 1]  # not the default device, where host-made arrays land first
    gc.collect()
    before = _bytes_on(device)
    target = load_target(str(folder), with_tokenizer=False, mesh=mesh)
    config = DecodeConfig(mode="dflash", block_size=4, batch_size=4, max_new_tokens=10, prompt_buckets=(16, 32),
                          prefill_chunk=16)
    dec = Decoder(target, config, random_drafter(target.config, block_size=4))
    rng = np.random.default_rng(3)
    for bucket in (16, 32):
        reqs = [Request(id=str(i), token_ids=[int(t) for t in rng.integers(3, 128, size=bucket - 2)],
                        max_new_tokens=8) for i in range(5)]
        assert len(list(dec.generate(reqs, bucket=bucket))) == 5
    p = plan(target.config, dec.drafter.config, decode=config, dtype="float32", data=2, model=2, capacity=10**9)
    gc.collect()
    assert _bytes_on(device) - before == p.held
