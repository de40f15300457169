"""The numerics setting: dtype names, and what "auto" resolves to."""

import jax.numpy as jnp
import pytest

from dflash_batch.decoder import DTYPES, DtypeError, checkpoint_dtype, jnp_dtype, resolve_dtype
from dflash_batch.decoder._dtype import CPU_AUTO


def test_an_explicit_dtype_is_kept_on_every_platform():
    for platform in ("cpu", "tpu", "gpu"):
        assert resolve_dtype("float32", {"torch_dtype": "bfloat16"}, platform) == "float32"
        assert resolve_dtype("bfloat16", {"torch_dtype": "float32"}, platform) == "bfloat16"


@pytest.mark.parametrize("stored", ["bfloat16", "float16", "float32", "torch.bfloat16"])
def test_auto_on_an_accelerator_runs_a_float_checkpoint_in_bfloat16(stored):
    assert resolve_dtype("auto", {"dtype": stored}, "tpu") == "bfloat16"
    assert resolve_dtype("auto", {"torch_dtype": stored}, "gpu") == "bfloat16"


def test_auto_on_cpu_is_the_dtype_measured_faster_whatever_the_checkpoint():
    assert CPU_AUTO in DTYPES and CPU_AUTO != "auto"
    for stored in ("bfloat16", "float32"):
        assert resolve_dtype("auto", {"torch_dtype": stored}, "cpu") == CPU_AUTO


def test_auto_without_a_platform_uses_this_process_backend():
    import jax

    assert resolve_dtype("auto", {"torch_dtype": "bfloat16"}) == resolve_dtype(
        "auto", {"torch_dtype": "bfloat16"}, jax.default_backend())


def test_the_checkpoint_dtype_is_read_from_either_key_of_config_json():
    assert checkpoint_dtype({"dtype": "bfloat16", "torch_dtype": "float32"}) == "bfloat16"  # the newer key wins
    assert checkpoint_dtype({"torch_dtype": "torch.float16"}) == "float16"
    assert checkpoint_dtype({}) == "float32"  # transformers' default


def test_unknown_settings_and_checkpoint_dtypes_are_refused_naming_the_choices():
    with pytest.raises(DtypeError, match="auto/bfloat16/float32, got 'fp16'"):
        resolve_dtype("fp16")
    with pytest.raises(DtypeError, match="'int4'.*set one of bfloat16/float32"):
        resolve_dtype("auto", {"torch_dtype": "int4"}, "tpu")


def test_resolved_names_map_to_jax_dtypes():
    assert jnp_dtype("bfloat16") == jnp.bfloat16 and jnp_dtype("float32") == jnp.float32
    with pytest.raises(DtypeError, match="once resolved"):
        jnp_dtype("auto")
