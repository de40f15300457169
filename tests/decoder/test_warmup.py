"""Warmup readies a batch in seconds: each program compiled once (timed on its own), and an
automatic block length's step costs measured once per machine and set of programs."""

from __future__ import annotations

import jax
import pytest

from compile_counter import count_compiles
from decoding import make_decoder

SETTINGS = dict(mode="ngram", block_size="auto", batch_size=2, max_new_tokens=8, prompt_buckets=(16,),
                prefill_chunk=16)


@pytest.fixture(autouse=True)
def few_block_candidates(monkeypatch):
    """Candidates 1, 2, 4 rather than up to 16: what warmup does is the same for any number of
    candidates, and the largest would take most of the compile time."""
    from dflash_batch.decoder import _state

    monkeypatch.setattr(_state, "PROPOSER_BLOCK", 4)


@pytest.fixture
def compilation_cache(tmp_path, monkeypatch):
    """The persistent compilation cache enabled in a fresh folder (restored afterwards)."""
    from dflash_batch.decoder import _compile_cache

    before = jax.config.jax_compilation_cache_dir
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setattr(_compile_cache, "_enabled", [])
    yield _compile_cache.enable_compilation_cache(tmp_path / "jax")
    jax.config.update("jax_compilation_cache_dir", before)


@pytest.mark.slow
def test_warmup_reports_each_program_and_the_block_costs(tiny_llama):
    dec = make_decoder(tiny_llama, **SETTINGS)
    dec.warmup(16)
    report = dec.block_report()["16"]
    programs = ["prefill"] + [f"decode L={b}" for b in dec.blocks]
    assert list(report["warmup_seconds"]) == programs + ["block costs"]
    assert all(v > 0 for v in report["warmup_seconds"].values()) and report["costs"] == "measured"
    assert set(report["step_ms"]) == {str(b) for b in dec.blocks}


@pytest.mark.slow
def test_a_second_warmup_of_the_same_programs_reuses_the_stored_costs(tiny_llama, compilation_cache):
    first = make_decoder(tiny_llama, **SETTINGS)
    first.warmup(16)
    assert first.block_report()["16"]["costs"] == "measured"
    assert list((compilation_cache / "dflash-block-costs").glob("*.json"))

    again = make_decoder(tiny_llama, **SETTINGS)
    calls = []
    engine = again.engine(16)
    decode = engine.phases.decode
    engine.phases.decode = lambda s, **kw: calls.append(int(kw["max_steps"])) or decode(s, **kw)
    with count_compiles() as compiles:
        again.warmup(16)
    assert calls == [0] * len(again.blocks)  # compiled only: no decode step ran
    assert again.block_report()["16"]["costs"] == "stored"
    assert again.engine(16).policy.costs == first.engine(16).policy.costs
    assert compiles() == 0  # the same programs: this process already holds them

    other = make_decoder(tiny_llama, **{**SETTINGS, "batch_size": 3})  # other programs: measured anew
    other.warmup(16)
    assert other.block_report()["16"]["costs"] == "measured"


@pytest.mark.slow
def test_a_rerun_prices_a_length_never_compiled_here_at_the_first_runs_cold_seconds(tiny_llama, compilation_cache,
                                                                                    monkeypatch):
    from dflash_batch.decoder import _engine
    from dflash_batch.decoder._cost_table import stored_seconds

    first = make_decoder(tiny_llama, **SETTINGS)
    first.warmup(16, lazy=True)  # AR and L=2: their costs are stored with what readying L=2 took
    cold = stored_seconds(first.engine(16)._costs_key((1, 2)))
    assert cold is not None and cold > 0
    again = make_decoder(tiny_llama, **SETTINGS)
    again.warmup(16, lazy=True)  # from the persistent cache, with the stored costs
    engine = again.engine(16)
    engine.add_seconds = 0.0  # as fast as a cached warmup can be
    # L=4 was never compiled here: readying it would cost what L=2 did cold, not what a cache hit does.
    reads = []
    load = _engine.load_costs
    monkeypatch.setattr(_engine, "load_costs", lambda key: reads.append(key) or load(key))
    assert engine.ready_seconds(4) == cold
    assert engine.ready_seconds(4) == cold  # asked before each decode call: the store is read once
    assert len(reads) == 1
    engine.warmup_seconds["decode L=4"] = 0.5  # as if L=4 had been readied here and its costs stored
    engine._cost_blocks(engine._compile_blocks(engine.fresh_state(), (4,)), (1, 4))
    assert engine.ready_seconds(4) == 0.0  # now in the cache: as cheap as the last length
