"""Training checkpoints: everything needed to continue the exact same trajectory.

A checkpoint is a folder with ``arrays.npz`` (every leaf of the parameters and the
optimiser state, bit-exact float32) and ``meta.json`` (step, seed, the run's
configuration and identity, the metric history). Batches and anchors are pure functions
of (seed, step), so the step and seed are the data order and the RNG state. The folder
is written beside the old one and swapped in with renames, so a kill at any moment
leaves a complete checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np


def save_checkpoint(folder: Path, state: Any, meta: dict) -> None:
    """Writes ``state`` (a pytree of arrays) and ``meta`` (JSON) atomically to ``folder``."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    leaves = jax.tree_util.tree_leaves(jax.device_get(state))
    np.savez(tmp / "arrays.npz", **{f"a{i:05d}": np.asarray(x) for i, x in enumerate(leaves)})
    (tmp / "meta.json").write_text(json.dumps(meta))
    for p in (tmp / "arrays.npz", tmp / "meta.json"):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, template: Any) -> tuple[Any, dict]:
    """Reads a checkpoint into the structure of ``template`` (same tree, shapes checked)."""
    folder = Path(folder)
    if not (folder / "meta.json").exists():
        old = folder.with_name(folder.name + ".old")  # killed between the two renames
        if (old / "meta.json").exists():
            folder = old
        else:
            raise FileNotFoundError(f"no checkpoint in {folder}")
    meta = json.loads((folder / "meta.json").read_text())
    leaves, treedef = jax.tree_util.tree_flatten(template)
    with np.load(folder / "arrays.npz") as z:
        stored = [z[f"a{i:05d}"] for i in range(len(z.files))]
    if len(stored) != len(leaves):
        raise ValueError(f"checkpoint {folder} holds {len(stored)} arrays, the run expects {len(leaves)}")
    for i, (a, b) in enumerate(zip(stored, leaves)):
        if a.shape != np.shape(b):
            raise ValueError(f"checkpoint array {i} has shape {a.shape}, the run expects {np.shape(b)}")
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(a) for a in stored]), meta


def has_checkpoint(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / "meta.json").exists() or (folder.with_name(folder.name + ".old") / "meta.json").exists()
