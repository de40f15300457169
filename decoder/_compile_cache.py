"""JAX's persistent compilation cache, so a second job on the same machine skips compiling."""

from __future__ import annotations

import os
from pathlib import Path

import jax

# Where this process keeps its persistent cache, once ``enable_compilation_cache`` chose it.
_enabled: list[Path] = []


def enable_compilation_cache(folder: Path | None = None) -> Path:
    """Points JAX's on-disk compilation cache at ``folder``.

    Default: ``$JAX_COMPILATION_CACHE_DIR`` when set (JAX's own setting, e.g. a test session's
    temporary folder), else the project cache. Jobs call this; measured decode-step costs are
    then kept beside the compiled programs (``_cost_table``).
    """
    from dflash_batch.decoder._storage import cache_dir

    env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    folder = Path(folder) if folder else Path(env) if env else cache_dir() / "jax"
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    _enabled[:] = [folder]
    return folder


def enabled_cache_dir() -> Path | None:
    """The folder ``enable_compilation_cache`` chose in this process, or None before it ran."""
    return _enabled[0] if _enabled else None
