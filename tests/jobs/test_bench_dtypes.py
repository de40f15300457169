"""``bench --dtypes``: the dtypes compared in the same rounds, each row over its own dtype's AR."""

from __future__ import annotations

import json
import statistics

import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from dflash_batch.decoder import Request, load_target
from dflash_batch.jobs import _bench
from dflash_batch.jobs._bench import BenchModel, bench, common_prefix_mean


@pytest.fixture(scope="module")
def rows_and_rounds(tiny_llama_dir):
    models = [BenchModel(name, load_target(str(tiny_llama_dir), dtype=dtype, with_tokenizer=False))
              for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))]
    rng = np.random.default_rng(5)
    reqs = [Request(id=str(i), token_ids=list(rng.integers(3, 128, size=10)), max_new_tokens=6) for i in range(2)]
    rounds: list[list[str]] = []
    run_rounds = _bench.run_rounds

    def spy(cells, repeats, say=lambda _m: None):
        rounds.append([c.dtype for c in cells])
        return run_rounds(cells, repeats, say)

    mp = pytest.MonkeyPatch()
    mp.setattr(_bench, "run_rounds", spy)
    try:
        rows = bench(models, reqs, [1, 2], 6, repeats=2, block_sizes=(), modes=(), prompt_buckets=(16,),
                     learning_rounds=0)  # AR only: its cells compile fastest, and every field is there
    finally:
        mp.undo()
    return rows, rounds


@pytest.mark.slow
def test_both_dtypes_run_in_the_same_rounds(rows_and_rounds):
    _, rounds = rows_and_rounds
    assert rounds == [["float32", "bfloat16"]] * 2  # one call per batch size, with every cell


def test_rows_carry_their_dtype_and_speedup_is_over_their_own_dtypes_ar(rows_and_rounds):
    rows, _ = rows_and_rounds
    assert [(r["batch_size"], r["dtype"], r["mode"]) for r in rows] == [
        (b, d, "ar") for b in (1, 2) for d in ("float32", "bfloat16")]
    for r in rows:
        ar = next(a for a in rows if (a["batch_size"], a["dtype"], a["mode"]) == (r["batch_size"], r["dtype"], "ar"))
        assert r["ar_runs"] == ar["runs"]
        assert r["speedup_runs"] == [x / a for x, a in zip(r["runs"], ar["runs"])]
        assert r["identical_fraction"] == 1.0
    assert all(r["speedup"] == 1.0 for r in rows if r["mode"] == "ar")


def test_speedup_vs_float32_ar_is_over_float32s_ar_of_the_same_batch_size(rows_and_rounds):
    rows, _ = rows_and_rounds
    for b in (1, 2):
        f32_ar = next(r for r in rows if (r["batch_size"], r["dtype"], r["mode"]) == (b, "float32", "ar"))
        bf16_ar = next(r for r in rows if (r["batch_size"], r["dtype"], r["mode"]) == (b, "bfloat16", "ar"))
        for r in rows:
            if r["batch_size"] == b and r["dtype"] == "float32":
                assert r["speedup_vs_float32_ar"] == r["speedup"]
                assert r["identical_fraction_vs_float32_ar"] == 1.0
        if b == 2:  # the median of same-round ratios (at batch 1: of paired rows)
            assert bf16_ar["speedup_vs_float32_ar"] == pytest.approx(
                statistics.median(x / a for x, a in zip(bf16_ar["runs"], f32_ar["runs"])))
        else:
            assert bf16_ar["speedup_vs_float32_ar"] > 0
        assert 0.0 <= bf16_ar["identical_fraction_vs_float32_ar"] <= 1.0
        assert 0.0 <= bf16_ar["common_prefix_vs_float32_ar"] <= 6


def test_the_table_shows_the_dtype_and_the_ratio_to_float32_ar(rows_and_rounds):
    rows, _ = rows_and_rounds
    table = _bench.format_table(rows)
    assert "dtype" in table.splitlines()[0] and "vs f32 AR" in table.splitlines()[0]
    assert sum("bfloat16" in line for line in table.splitlines()) == 2


def test_common_prefix_mean_counts_tokens_until_the_first_difference():
    assert common_prefix_mean({"a": [1, 2, 3], "b": [4, 5]}, {"a": [1, 2, 9], "b": [4, 5, 6]}) == (2 + 2) / 2


def test_bench_dtypes_resolves_auto_and_keeps_each_dtype_once(tiny_llama_dir):
    from dflash_batch.decoder._dtype import CPU_AUTO

    assert _bench.bench_dtypes("auto, float32,bfloat16", str(tiny_llama_dir)) == list(
        dict.fromkeys([CPU_AUTO, "float32", "bfloat16"]))
    with pytest.raises(ValueError, match="auto/bfloat16/float32, got 'fp32'"):
        _bench.bench_dtypes("fp32", str(tiny_llama_dir))


def test_the_cli_refuses_an_unknown_dtype_naming_the_option():
    from dflash_batch.jobs.cli import main

    result = CliRunner().invoke(main, ["bench", "--dtypes", "float32,int3"])
    assert result.exit_code == 2 and "--dtypes" in result.output and "int3" in result.output


def test_without_dtypes_the_bench_runs_the_jobs_model_dtype(tmp_path, chat_model_dir):
    from job_helpers import sentence, write_prompts

    from dflash_batch.jobs.cli import main

    write_prompts(tmp_path / "in" / "p.parquet", [{"id": f"r{i}", "prompt": sentence(i)} for i in range(2)])
    job = tmp_path / "job.toml"
    job.write_text(f'name = "b"\ninput = "{tmp_path}/in/*.parquet"\noutput = "{tmp_path}/out"\n'
                   f'[model]\ntarget = "{chat_model_dir}"\n[decode]\nmax_new_tokens = 4\nprompt_buckets = [16, 64]\n'
                   '[prompt]\ntemplate = "none"\n')
    result = CliRunner().invoke(main, ["bench", str(job), "--set", "model.dtype=bfloat16", "--batch-sizes", "2",
                                       "--modes", "", "--repeats", "1", "--learning-rounds", "0", "--json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output[result.output.index("["):])
    assert (row["dtype"], row["mode"], row["speedup"]) == ("bfloat16", "ar", 1.0)
    assert row["speedup_vs_float32_ar"] is None  # float32 was not benched
