"""The kernel micro-benchmark (tools/kernel_bench.py) runs its CPU path end to end."""

import jax
import pytest


def test_bench_runs_on_cpu(capsys):
    import kernel_bench

    if jax.default_backend() != "cpu":
        pytest.skip("the CPU path of the benchmark")
    assert kernel_bench.main(["--batches", "2", "--contexts", "24", "--blocks", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "No accelerator" in out and "verify smollm2-135m" in out and "draft  smollm2-135m" in out
