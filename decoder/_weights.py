"""One loader for every checkpoint: a name table maps checkpoint tensors to the decoder's layout.

Targets (Hugging Face names) and drafters (z-lab names) differ only in their tables. A
table row says where a parameter goes in the pytree, which checkpoint tensors make it
(``{i}`` stands for the layer index), and whether each is transposed from the
checkpoint's [out, in] to the decoder's [in, out]. Several names on one row are fused
along the output axis (q|k|v, gate|up); a ``layered`` row is stacked over layers.

Loading (``params_from_table``):
  1. Check that the checkpoint holds exactly the table's tensors (``exact``: a drafter's
     extra tensor could silently change results) with the shapes the config implies.
  2. Cast every tensor ONCE, straight from its stored dtype to the requested one: a
     bfloat16 checkpoint loaded as bfloat16 is never copied through float32, and a
     float32 one is rounded once, to nearest even, as ``astype`` does on the device.
  3. Transpose, fuse and stack in that dtype on the host, then place each parameter: on
     one device, or shard by shard onto a mesh (``_mesh.layout_params``).
``tensors_from_table`` is the inverse, for writing checkpoints.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Row:
    """One parameter: its pytree path, its checkpoint tensors, and how they are laid out."""

    path: tuple[str, ...]  # e.g. ("layers", "qkv")
    names: tuple[str, ...]  # checkpoint names, fused in this order; "{i}" = layer index
    transpose: bool = False  # [out, in] in the checkpoint, [in, out] in the decoder
    layered: bool = False  # one tensor per layer, stacked on a leading axis
    cast: bool = True  # False for index tables (d2t), which keep their integer dtype


def table_names(table: list[Row], num_layers: int) -> list[str]:
    """Every checkpoint name the table reads."""
    layers = range(num_layers)
    return [n.format(i=i) for row in table for n in row.names for i in (layers if row.layered else (0,))]


def _check(tensors: Mapping[str, np.ndarray], table: list[Row], num_layers: int,
           shapes: Mapping[str, tuple[int, ...]] | None, exact: bool) -> None:
    want = table_names(table, num_layers)
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want)) if exact else []
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match its config: {missing=} {unexpected=}")
    for name, shape in (shapes or {}).items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, config implies {tuple(shape)}")


def params_from_table(table: list[Row], tensors: Mapping[str, np.ndarray], num_layers: int, dtype,
                      *, shapes: Mapping[str, tuple[int, ...]] | None = None, exact: bool = False,
                      place: Callable[[Params], Params] | None = None) -> Params:
    """The decoder's parameter pytree of a checkpoint (steps 1-3 of the module docstring).

    ``place`` takes the host pytree (numpy, already in ``dtype``) and puts it on devices;
    None puts each array on the default device.
    """
    _check(tensors, table, num_layers, shapes, exact)
    np_dtype = np.dtype(jnp.dtype(dtype))

    def one(name: str, row: Row) -> np.ndarray:
        a = np.asarray(tensors[name])
        a = a.astype(np_dtype, copy=False) if row.cast else a  # the one cast; no copy when already there
        return a.T if row.transpose else a

    def build(row: Row, i: int) -> np.ndarray:
        parts = [one(n.format(i=i), row) for n in row.names]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)

    host: Params = {}
    for row in table:
        value = np.stack([build(row, i) for i in range(num_layers)]) if row.layered else build(row, 0)
        node = host
        for key in row.path[:-1]:
            node = node.setdefault(key, {})
        node[row.path[-1]] = np.ascontiguousarray(value)
    if place is not None:
        return place(host)
    return _map(jnp.asarray, host)


def tensors_from_table(table: list[Row], params: Params, num_layers: int,
                       split: Mapping[tuple[str, ...], list[int]]) -> dict[str, np.ndarray]:
    """Checkpoint tensors of a parameter pytree, in the parameters' own dtypes.

    ``split`` gives, per fused row, the widths of its parts along the output axis.
    """
    out: dict[str, np.ndarray] = {}
    for row in table:
        value = params
        for key in row.path:
            value = value[key]
        value = np.asarray(value)
        for i in range(num_layers) if row.layered else (0,):
            v = value[i] if row.layered else value
            parts = np.split(v, np.cumsum(split[row.path])[:-1], axis=-1) if len(row.names) > 1 else [v]
            for name, part in zip(row.names, parts):
                out[name.format(i=i)] = np.ascontiguousarray(part.T if row.transpose else part)
    return out


def _map(fn, tree):
    return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}
