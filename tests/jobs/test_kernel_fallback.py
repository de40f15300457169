"""A job whose attention kernel fails its self-check decodes with the reference, and its stats and
audit say so: which implementation decoded, and the fallback with its reason."""

from __future__ import annotations

import jax
import pytest
from click.testing import CliRunner
from fresh_process import fresh_kernel_checks, fresh_worker
from job_helpers import job_spec, job_stats, sentence, write_prompts

from dflash_batch.jobs.cli import main
from dflash_batch.kernels import KernelFallbackWarning, _block_attention
from dflash_batch.pipeline import build


@pytest.fixture
def fresh_kernels():
    """No verdict, no traced program and no loaded model from an earlier test."""
    jax.clear_caches()
    with fresh_kernel_checks(), fresh_worker():
        yield
    jax.clear_caches()


@pytest.mark.slow
def test_the_job_stats_and_audit_record_a_kernel_fallback(tmp_path, chat_model_dir, monkeypatch, fresh_kernels):
    real = _block_attention.run_kernel

    def wrong(*args, causal, **kwargs):  # a verify kernel that is off by 0.01, as a bad lowering might be
        return real(*args, causal=causal, **kwargs) + (0.01 if causal else 0.0)

    monkeypatch.setattr(_block_attention, "run_kernel", wrong)
    monkeypatch.setenv("DFLASH_BATCH_KERNELS", "interpret")  # the kernels, as on a TPU (read at trace time)
    prompts = write_prompts(tmp_path / "in" / "p.parquet", [{"id": str(i), "prompt": sentence(i)} for i in range(3)])
    out = tmp_path / "out"
    with pytest.warns(KernelFallbackWarning):
        build(job_spec(chat_model_dir, prompts, out)).run()

    stats = job_stats(out)
    [verify] = stats["attention"]["verify_attention"]
    assert verify.startswith("reference (fallback: interpret kernel self-check on cpu")
    assert "FAILED: float32 output differs from the reference" in verify
    assert stats["kernel_fallbacks"] == [f"verify_attention: {verify}"]
    assert stats["this_run"]["kernel_fallbacks"] == stats["kernel_fallbacks"]

    audit = CliRunner().invoke(main, ["audit", str(out)])
    assert audit.exit_code == 0, audit.output
    assert "attention: verify reference (fallback: interpret kernel self-check" in audit.output
    assert "WARNING kernel fallback: verify_attention: reference (fallback:" in audit.output


def test_the_job_stats_record_the_reference_where_no_kernel_runs(tmp_path, chat_model_dir, fresh_kernels):
    prompts = write_prompts(tmp_path / "in" / "p.parquet", [{"id": "a", "prompt": sentence(1)}])
    build(job_spec(chat_model_dir, prompts, tmp_path / "out")).run()
    stats = job_stats(tmp_path / "out")
    assert stats["attention"] == {"verify_attention": ["reference"]}  # CPU: the reference, by default
    assert stats["kernel_fallbacks"] == []
