"""JAX's persistent compilation cache, so a second job on the same machine skips compiling."""

from __future__ import annotations

from pathlib import Path

import jax


def enable_compilation_cache(folder: Path | None = None) -> Path:
    """Points JAX's on-disk compilation cache at ``folder`` (default: the project cache)."""
    from dflash_batch.decoder._storage import cache_dir

    folder = Path(folder) if folder else cache_dir() / "jax"
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return folder
