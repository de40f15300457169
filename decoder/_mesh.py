"""One device mesh per worker process: data parallel x tensor parallel over its local chips.

The mesh has two axes, ``('data', 'model')`` (D x T chips):
  * ``data`` splits the static batch: every per-row array (lengths, budgets, done flags, RNG
    keys, completions, the drafter's context lengths) and the batch axis of the KV caches.
    Data parallelism changes no arithmetic, so a row decodes the same on any D.
  * ``model`` is Megatron tensor parallelism: q/k/v are split over heads and o over its
    input; gate/up over F and down over its input; the embedding and lm_head over the
    vocabulary (replicated when V % T != 0, which the memory plan counts); norms replicated.
    The KV caches [layers, B, K, S, H] are split over kv heads. The partial sums after o and down
    are all-reduced, so logits differ from one chip's in the last bits of fp32.

With T > 1 the fused q|k|v and gate|up projections are stored as separate q, k, v, gate, up
matrices, so that each chip's slice holds whole heads (and matching gate and up columns).

Weights go from the host straight into their shards (``jax.device_put`` per tensor with a
``NamedSharding``): no chip ever holds a full copy of a sharded tensor. A 1 x 1 mesh is the
plain single-device decoder: nothing is placed or constrained.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "model")
KV_SPEC = P(None, "data", "model", None, None)  # [layers, B, K, S, H]
ROW_SPEC = P("data")  # [B, ...]: per-row state


def make_mesh(data: int, model: int, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``('data', 'model')`` mesh of ``data`` x ``model`` devices (default: this process's local
    devices, all of them used). ``model`` consecutive devices form one tensor-parallel group, so
    its all-reduces stay between neighbours."""
    devices = list(jax.local_devices() if devices is None else devices)
    if data < 1 or model < 1:
        raise ValueError(f"{data=} and {model=} must be >= 1")
    if data * model > len(devices):
        raise ValueError(f"a {data} x {model} mesh needs {data * model} devices; {len(devices)} are available")
    return Mesh(np.array(devices[: data * model], dtype=object).reshape(data, model), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def is_sharded(mesh: Mesh | None) -> bool:
    """Whether the mesh spans more than one device (a 1 x 1 mesh is the plain decoder)."""
    return mesh is not None and mesh.size > 1


def mesh_shape(mesh: Mesh | None) -> tuple[int, int]:
    """(D, T) of a mesh; (1, 1) for None."""
    if mesh is None:
        return 1, 1
    return int(mesh.shape["data"]), int(mesh.shape["model"])


def describe(mesh: Mesh | None) -> str:
    """The mesh as the progress line and job stats show it, e.g. ``cpu x6, data 2 x model 3``."""
    d, t = mesh_shape(mesh)
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    kind = devices[0].platform
    if kind == "tpu":
        kind = f"tpu {devices[0].device_kind}"
    return f"{kind} x{d * t}, data {d} x model {t}"


def tensor_parallel_problems(t: int, cfg, dcfg=None) -> list[str]:
    """Why tensor parallel degree ``t`` cannot split this target (and drafter); [] when it can.

    Heads are atomic: each chip takes N/T query heads and their K/T kv heads, so T must divide
    both head counts (hence T <= K) and the MLP's F. The vocabulary need not divide: the
    embedding and lm_head are then replicated.
    """
    out = []
    for who, c in (("target", cfg), ("drafter", dcfg)):
        if c is None:
            continue
        for name, n in (("query heads", c.num_heads), ("kv heads", c.num_kv_heads),
                        ("intermediate_size", c.intermediate_size)):
            if n % t:
                out.append(f"the {who}'s {n} {name} are not divisible by {t}")
    return out


def legal_tensor_parallel(cfg, dcfg=None, limit: int = 64) -> list[int]:
    """Tensor parallel degrees (up to ``limit``) that split this target and drafter."""
    return [t for t in range(1, limit + 1) if not tensor_parallel_problems(t, cfg, dcfg)]


# --- parameter layout ---------------------------------------------------------------


def split_fused(layers: dict[str, Any], num_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, Any]:
    """Host layer weights with q|k|v and gate|up fused -> separate q, k, v, gate, up (T > 1)."""
    out = dict(layers)
    if "qkv" in out:
        nq, nk = num_heads * head_dim, num_kv_heads * head_dim
        out["q"], out["k"], out["v"] = np.split(np.asarray(out.pop("qkv")), [nq, nq + nk], axis=-1)
    if "gate_up" in out:
        out["gate"], out["up"] = np.split(np.asarray(out.pop("gate_up")), 2, axis=-1)
    return out


_LAYER_SPECS = {  # stacked layers: a leading layers axis
    "q": P(None, None, "model"), "k": P(None, None, "model"), "v": P(None, None, "model"),  # [layers, D, heads*H]
    "o": P(None, "model", None),  # [layers, N*H, D]
    "gate": P(None, None, "model"), "up": P(None, None, "model"),  # [layers, D, F]
    "down": P(None, "model", None),  # [layers, F, D]
}


def param_specs(params: dict[str, Any], t: int, vocab_size: int) -> dict[str, Any]:
    """PartitionSpecs for a target's or a drafter's parameters (same tree).

    Anything not named here is replicated: norms, the drafter's ``fc`` and mask embedding,
    ``d2t``, and (T = 1) the fused projections.
    """
    vocab = t > 1 and vocab_size % t == 0

    def spec(path: tuple[str, ...], leaf) -> P:
        name = path[-1]
        if t == 1:
            return P()
        if path[0] == "layers" and name in _LAYER_SPECS:
            return _LAYER_SPECS[name]
        if name == "embed":  # [V, D]
            return P("model", None) if vocab else P()
        if name == "lm_head":  # [D, V] (or [D, V_d] for a reduced drafter vocabulary)
            return P(None, "model") if leaf.shape[-1] % t == 0 else P()
        return P()

    return _map_with_names(spec, params)


def _map_with_names(fn, tree):
    def name(k) -> str:
        return str(getattr(k, "key", getattr(k, "name", k)))

    return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(tuple(name(k) for k in path), leaf), tree)


def place(host_tree, specs, mesh: Mesh):
    """Puts host arrays onto the mesh, one tensor at a time, each straight into its shards."""
    return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), host_tree, specs,
                        is_leaf=lambda x: x is None)


def layout_params(host: dict[str, Any], cfg, mesh: Mesh) -> dict[str, Any]:
    """A target's or drafter's host parameters placed on the mesh in the layout above."""
    _, t = mesh_shape(mesh)
    host = jax.tree.map(np.asarray, host)
    if t > 1:
        host = {**host, "layers": split_fused(host["layers"], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)}
    return place(host, param_specs(host, t, cfg.vocab_size), mesh)


# --- decode state -------------------------------------------------------------------


def state_specs(state) -> Any:
    """PartitionSpecs for a slot state (``Slots`` with its mode's extra state; shapes suffice).

    KV caches (target and drafter context) split batch over ``data`` and kv heads over ``model``;
    every other per-row array splits its batch axis over ``data``; the proposal statistics,
    which pool the whole batch, are replicated.
    """

    def spec(path: tuple[str, ...], leaf) -> P:
        if "stats" in path or not getattr(leaf, "shape", ()):
            return P()
        if path[-1] in ("k", "v", "ctx_k", "ctx_v"):
            return KV_SPEC
        return ROW_SPEC

    return _map_with_names(spec, state)


def shardings(specs, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


@contextlib.contextmanager
def active(mesh: Mesh | None) -> Iterator[None]:
    """Makes the mesh visible to code being traced (sampling's sharding constraint, the kernels'
    ``shard_map``); a no-op for a 1 x 1 mesh."""
    if not is_sharded(mesh):
        yield
        return
    with jax.set_mesh(mesh):
        yield


def current_mesh():
    """The mesh being traced under (``active``), or None on a single device."""
    m = jax.sharding.get_abstract_mesh()
    if m is None or m.empty or "data" not in m.axis_names:
        return None
    return m


def unshard_vocab(logits: jax.Array) -> jax.Array:
    """logits [B, ..., V] with the vocabulary gathered onto every chip and the batch still split
    over ``data``: sampling sorts along V, which needs every logit of a row in one place."""
    m = current_mesh()
    if m is None:
        return logits
    return jax.lax.with_sharding_constraint(logits, P("data", *([None] * (logits.ndim - 1))))


def _on_mesh(tree, mesh: Mesh) -> bool:
    return all(isinstance(getattr(a, "sharding", None), NamedSharding) and a.sharding.mesh == mesh
               for a in jax.tree.leaves(tree))


def check_mesh(mesh: Mesh | None, target, drafter, batch_size: int):
    """Checks that a decoder can run on ``mesh`` (ValueError naming what to change); returns the
    drafter laid out on it, placing a drafter made in memory."""
    if not is_sharded(mesh):
        return drafter
    d, t = mesh_shape(mesh)
    if not _on_mesh(target.params, mesh):
        raise ValueError("the target's parameters are not laid out on its mesh; load it with "
                         "load_target(..., mesh=mesh)")
    if batch_size % d:
        raise ValueError(f"{batch_size=} must be divisible by the data-parallel degree {d}")
    dcfg = drafter.config if drafter is not None else None
    problems = tensor_parallel_problems(t, target.config, dcfg)
    if problems:
        raise ValueError(f"tensor parallel degree {t}: {'; '.join(problems)} "
                         f"(degrees that split this model: {legal_tensor_parallel(target.config, dcfg, 16)})")
    if drafter is not None and not _on_mesh(drafter.params, mesh):
        drafter = drafter.replace(params=layout_params(jax.device_get(drafter.params), dcfg, mesh))
    return drafter
