"""Decoding on a ('data', 'model') mesh of simulated CPU devices.

Run by tests/test_simulated_devices.py in a process with 8 devices. Within a mesh every mode is
token-identical to AR (greedy, and sampling seed for seed: a speculative step commits exactly
the token AR samples at that position). Across meshes, data parallelism changes no arithmetic;
tensor parallelism all-reduces partial sums after o and down, so logits agree to a float32
tolerance (``TP_ATOL``) rather than bit for bit.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from compile_counter import count_compiles
from dflash_batch.decoder import DecodeConfig, Decoder, Request, load_target, make_mesh
from dflash_batch.decoder._cache import KVCache
from dflash_batch.decoder._mesh import active
from dflash_batch.decoder._target import forward
from tiny_models import make_tiny_checkpoint, random_drafter

# D x T: data parallel alone, and data and tensor parallel at once. (A 1 x 1 mesh is the plain
# decoder, whose modes tests/decoder/test_speculative.py holds to AR; tensor parallel alone, 1 x 2,
# and 4 x 2 run the code of 2 x 4 with other degrees: their AR tokens and logits are compared
# below, and the speculative modes add no sharding of their own there.)
MESHES = [(8, 1), (2, 4)]
SPEC_MODES = ("dflash", "ngram", "hybrid")
TP_ATOL = 1e-4  # logits of the tiny models are O(10); float32 reduction order moves them by ~1e-6
BATCH, NEW, BUCKET = 8, 10, 32


@pytest.fixture(scope="session")
def wide_dir(tmp_path_factory):
    """A tiny Llama with 8 query and 4 kv heads, so tensor parallel 2 and 4 are legal."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("wide"), "llama", seed=3, num_attention_heads=8,
                                num_key_value_heads=4)


@pytest.fixture(scope="session")
def wide_qwen3_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("wide-qwen3"), "qwen3", seed=4, num_attention_heads=8,
                                num_key_value_heads=4)


@pytest.fixture(scope="session")
def drafter(wide_dir):
    return random_drafter(load_target(str(wide_dir), with_tokenizer=False).config, block_size=4)


_targets: dict = {}
_decoders: dict = {}


def target_on(folder, shape):
    key = (str(folder), shape)
    if key not in _targets:
        _targets[key] = load_target(str(folder), with_tokenizer=False, mesh=make_mesh(*shape))
    return _targets[key]


def decoder(folder, shape, mode, drafter=None):
    key = (str(folder), shape, mode)
    if key not in _decoders:
        target = target_on(folder, shape)
        config = DecodeConfig(mode=mode, batch_size=BATCH, max_new_tokens=NEW, prompt_buckets=(BUCKET,),
                              prefill_chunk=16, block_size=4 if mode != "ar" else "auto")
        _decoders[key] = Decoder(target, config, drafter if mode in ("dflash", "hybrid") else None)
    return _decoders[key]


def requests(temperature=0.0, n=12):
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        prompt = [int(t) for t in rng.integers(3, 128, size=int(rng.integers(3, 30)))]
        if i % 3 == 0:
            prompt = (prompt[:6] * 4)[:28]  # repetition, so n-gram drafts get accepted
        out.append(Request(id=str(i), token_ids=prompt, max_new_tokens=NEW - i % 4, temperature=temperature,
                           top_p=0.9 if temperature else 1.0, seed=100 + i))
    return out


def tokens(dec, reqs):
    return {r.id: r.token_ids for r in dec.generate(reqs, bucket=BUCKET)}


def test_the_devices_are_simulated():
    assert jax.device_count() == 8


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_mode_is_token_identical_to_ar_on_the_same_mesh(wide_dir, drafter, shape):
    for temperature in (0.0, 0.8):
        reqs = requests(temperature)
        want = tokens(decoder(wide_dir, shape, "ar"), reqs)
        assert all(want.values())
        for mode in SPEC_MODES:
            got = tokens(decoder(wide_dir, shape, mode, drafter), reqs)
            assert got == want, (mode, temperature)


def test_ar_on_8x1_equals_ar_on_1x1(wide_dir):
    for temperature in (0.0, 0.8):
        reqs = requests(temperature)
        assert tokens(decoder(wide_dir, (8, 1), "ar"), reqs) == tokens(decoder(wide_dir, (1, 1), "ar"), reqs)


@pytest.mark.parametrize("shape", [(2, 4), (4, 2), (1, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_tensor_parallel_greedy_tokens_equal_one_device(wide_dir, shape):
    reqs = requests(0.0)
    assert tokens(decoder(wide_dir, shape, "ar"), reqs) == tokens(decoder(wide_dir, (1, 1), "ar"), reqs)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("shape", [(2, 4), (4, 2), (1, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_tensor_parallel_logits_within_float32_tolerance(wide_dir, wide_qwen3_dir, family, shape):
    folder = wide_dir if family == "llama" else wide_qwen3_dir
    one, sharded = target_on(folder, (1, 1)), target_on(folder, shape)
    cfg = one.config
    toks = np.random.default_rng(1).integers(3, cfg.vocab_size, size=(8, 12)).astype(np.int32)
    start = np.zeros((8,), np.int32)
    want, _, _ = jax.jit(forward, static_argnums=1)(one.params, cfg, toks, start, KVCache.init(cfg, 8, 16))
    with active(sharded.mesh):
        got, _, _ = jax.jit(forward, static_argnums=1)(sharded.params, cfg, toks, start, KVCache.init(cfg, 8, 16))
    got, want = np.asarray(got), np.asarray(want)
    assert np.abs(got - want).max() < TP_ATOL
    assert np.abs(want).max() > 1.0  # the tolerance is small against the logits themselves


def test_each_device_holds_its_share_of_every_weight_and_of_the_kv_cache(wide_dir, drafter):
    d, t = 2, 4
    dec = decoder(wide_dir, (d, t), "dflash", drafter)
    tokens(dec, requests()[:2])  # the engine's state exists now
    layers = dec.target.params["layers"]
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        a = layers[name]
        for shard in a.addressable_shards:
            assert shard.data.size * t == a.size, name  # 1/T each, so no device holds a full copy
    assert "qkv" not in layers and "gate_up" not in layers
    emb = dec.target.params["embed"]
    assert all(s.data.shape == (emb.shape[0] // t, emb.shape[1]) for s in emb.addressable_shards)
    dlayers = dec.drafter.params["layers"]
    assert all(s.data.size * t == dlayers["q"].size for s in dlayers["q"].addressable_shards)
    assert all(s.data.size == dec.drafter.params["fc"].size for s in dec.drafter.params["fc"].addressable_shards)
    state = dec.engine(BUCKET).state
    for cache in (state.cache.k, state.cache.v, state.extra.ctx_k):
        shards = cache.addressable_shards
        assert len(shards) == d * t
        assert all(s.data.size * d * t == cache.size for s in shards)
        assert len({s.device for s in shards}) == d * t
    for row_state in (state.pos, state.done, state.key, state.out):
        assert all(s.data.shape[0] * d == BATCH for s in row_state.addressable_shards)


def test_no_compilation_after_warmup_on_a_mesh(wide_dir, drafter):
    """Sharded state and parameters reach the compiled programs with the layouts they were compiled
    for. (The automatic block length's programs are held to the same on one device, in
    tests/decoder/test_speculative.py; the mesh adds only the shardings, the same at any block.)"""
    dec = decoder(wide_dir, (2, 4), "hybrid", drafter)
    dec.warmup(BUCKET)
    with count_compiles() as compiles:
        for temperature in (0.0, 0.8):
            got = tokens(dec, requests(temperature))
            assert len(got) == 12
        assert compiles() == 0


def test_a_parked_state_comes_back_in_its_shards_and_nothing_recompiles(wide_dir, drafter):
    """A lazy warmup parks the batch's state on the host while it compiles a larger block
    length; on a mesh the state must come back sharded as it was, or every program recompiles."""
    from dflash_batch.decoder._lazy_blocks import park, unpark

    dec = decoder(wide_dir, (2, 4), "hybrid", drafter)
    reqs = requests(0.0)
    want = tokens(dec, reqs)
    engine = dec.engine(BUCKET)
    before = engine.state
    shardings = [a.sharding for a in jax.tree.leaves(before)]
    host, where = park(before)
    engine.state = None
    back = unpark(host, where)
    assert [a.sharding for a in jax.tree.leaves(back)] == shardings
    assert all(np.array_equal(np.asarray(a), h) for a, h in zip(jax.tree.leaves(back), host))
    engine.state = back
    with count_compiles() as compiles:
        assert tokens(dec, reqs) == want
        assert compiles() == 0


def test_a_target_not_loaded_onto_its_mesh_is_refused(wide_dir):
    import dataclasses

    # Parameters left on one device under a mesh (e.g. swapped in after loading).
    stray = dataclasses.replace(load_target(str(wide_dir), with_tokenizer=False), mesh=make_mesh(2, 4))
    with pytest.raises(ValueError, match="load_target"):
        Decoder(stray, DecodeConfig(batch_size=BATCH))
    with pytest.raises(ValueError, match="batch_size=6 must be divisible by the data-parallel degree 4"):
        Decoder(target_on(wide_dir, (4, 2)), DecodeConfig(batch_size=6))


def test_bf16_hybrid_is_token_identical_to_bf16_ar_on_a_2x2_mesh(wide_dir, drafter, tmp_path):
    """Data and tensor parallel at once, in bf16: weights, KV cache and drafter context in bf16.
    Hybrid runs both proposers (the drafter's block and the n-gram lookup) in one program."""
    import jax.numpy as jnp

    from dflash_batch.decoder import load_drafter
    from dflash_batch.decoder._drafter_checkpoint import save_drafter

    mesh = make_mesh(2, 2)
    target = load_target(str(wide_dir), dtype="bfloat16", with_tokenizer=False, mesh=mesh)
    # The drafter goes onto the mesh as a job's does: from its checkpoint, straight into its shards.
    folder = save_drafter(tmp_path / "drafter", drafter.config, jax.device_get(drafter.params), dtype=jnp.bfloat16)
    d16 = load_drafter(folder, dtype="bfloat16", mesh=mesh)

    def run(mode):
        config = DecodeConfig(mode=mode, batch_size=BATCH, max_new_tokens=NEW, prompt_buckets=(BUCKET,),
                              prefill_chunk=16, block_size=4 if mode != "ar" else "auto")
        return tokens(Decoder(target, config, d16 if mode in ("dflash", "hybrid") else None), reqs)

    reqs = requests(0.0)
    want = run("ar")
    assert all(want.values())
    assert run("hybrid") == want
