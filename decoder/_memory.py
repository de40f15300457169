"""The memory plan: what one chip holds for a decode job, and the mesh layout that fits.

Per chip, for a mesh of D (data) x T (model) chips (layouts as in ``_mesh``):
  * weights: the target's, sharded parameters / T, the rest whole;
  * drafter: its layers / T; ``fc``, norms, mask embedding and d2t whole (it borrows the
    target's embedding and lm_head, counted once under weights);
  * kv_cache: 2 L (B/D) (K/T) S H bytes-per-element, S = the largest prompt bucket rounded up
    to whole prefill chunks, plus max_new_tokens (the decoder's cache length);
  * drafter_cache: the drafter's context K/V, 2 Ld (B/D) (Kd/T) S Hd, plus the token history;
  * activations: the largest working set of one verify pass at block length L: the logits
    [B/D, L, V/T] fp32 and, for sampling, two gathered [B/D, L, V] copies (sort); one layer's
    attention scores [B/D, L, N/T, S] fp32 and MLP [B/D, L, 2F/T]; every layer's new K/V and
    the collected features. An estimate, not XLA's exact allocation; ``USABLE`` leaves a
    margin for the runtime and XLA's temporaries.

``choose_layout`` picks D x T: the smallest tensor-parallel degree that splits the heads and
fits, the remaining chips to data parallel (a verify step is compute-bound, and tensor
parallelism costs an all-reduce per layer), or checks the degrees a job fixed.
"""

from __future__ import annotations

import dataclasses
import math

from dflash_batch.decoder._mesh import legal_tensor_parallel, tensor_parallel_problems

GB = 10**9
HBM_PER_CHIP = {"v5e": 16 * GB, "v6e": 32 * GB, "v5p": 95 * GB}  # Google's published HBM per chip
USABLE = 0.9  # share of a chip's memory the plan may fill
PREFILL_CHUNK = 64  # the decoder's default prompt chunk: the cache rounds the bucket up to it


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per chip of a decode job on a D x T mesh of chips with ``capacity`` bytes each."""

    data: int
    model: int
    capacity: int
    weights: int
    drafter: int
    kv_cache: int
    drafter_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.drafter + self.kv_cache + self.drafter_cache + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= USABLE * self.capacity

    def lines(self) -> list[str]:
        """The plan as a dry run prints it."""
        gb = lambda n: f"{n / GB:.2f} GB"  # noqa: E731
        return [
            f"mesh: data {self.data} x model {self.model}",
            f"per chip: weights {gb(self.weights)}, drafter {gb(self.drafter)}, KV cache {gb(self.kv_cache)}, "
            f"drafter context {gb(self.drafter_cache)}, activations {gb(self.activations)}",
            f"total {gb(self.total)} of {gb(self.capacity)} per chip ({USABLE:.0%} usable): "
            + ("fits" if self.fits else "does NOT fit"),
        ]


class LayoutError(ValueError):
    """A mesh layout that cannot work; ``setting`` names what to change
    (``data_parallel``, ``tensor_parallel``, ``batch_size`` or ``topology``)."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


def cache_length(largest_bucket: int, max_new_tokens: int, prefill_chunk: int = PREFILL_CHUNK) -> int:
    """The decoder's cache length for a batch of the largest bucket (see ``Decoder.engine``)."""
    return -(-largest_bucket // prefill_chunk) * prefill_chunk + max_new_tokens


def _split(n: int, t: int) -> int:
    return n // t if t > 1 and n % t == 0 else n


def _layer_params(c, t: int, qk_norm: bool) -> int:
    """Elements per chip of one transformer layer (target or drafter)."""
    d, h = c.hidden_size, c.head_dim
    sharded = d * (c.num_heads + 2 * c.num_kv_heads) * h + c.num_heads * h * d + 3 * d * c.intermediate_size
    return sharded // t + 2 * d + (2 * h if qk_norm else 0)


def target_weight_bytes(cfg, t: int, dtype_bytes: int) -> int:
    v, d = cfg.vocab_size, cfg.hidden_size
    vocab = _split(v, t) * d * (1 if cfg.tie_word_embeddings else 2)
    return (vocab + d + cfg.num_layers * _layer_params(cfg, t, cfg.qk_norm)) * dtype_bytes


def drafter_weight_bytes(dcfg, t: int, dtype_bytes: int) -> int:
    if dcfg is None:
        return 0
    d = dcfg.hidden_size
    n = dcfg.num_layers * _layer_params(dcfg, t, True) + dcfg.num_features * d * d + 2 * d
    n += d if dcfg.mask_embedding else 0
    extra = 0
    if dcfg.draft_vocab_size is not None:
        n += d * _split(dcfg.draft_vocab_size, t)
        extra = 4 * dcfg.draft_vocab_size  # d2t, int32
    return n * dtype_bytes + extra


def plan(cfg, dcfg=None, *, batch_size: int, cache_len: int, data: int, model: int, capacity: int,
         block: int = 16, dtype_bytes: int = 4, cache_bytes: int = 4, sampling: bool = True) -> MemoryPlan:
    """Per-chip bytes of a decode job (see the module docstring for what each figure counts).

    ``block``: the verified block length (1 for AR); ``dtype_bytes`` / ``cache_bytes``: bytes per
    weight / cache element (the decoder loads float32 today: 4 and 4).
    """
    rows = -(-batch_size // data)
    t = model
    kv = 2 * cfg.num_layers * rows * _split(cfg.num_kv_heads, t) * cache_len * cfg.head_dim * cache_bytes
    dcache = 0
    if block > 1:  # speculative modes keep each row's token history
        dcache += rows * cache_len * 4
    if dcfg is not None:
        dcache += 2 * dcfg.num_layers * rows * _split(dcfg.num_kv_heads, t) * cache_len * dcfg.head_dim * 4
    v, d = cfg.vocab_size, cfg.hidden_size
    act = rows * block * _split(v, t) * 4  # verify logits
    if sampling:
        act += 2 * rows * block * v * 4  # gathered and sorted for top-p
    act += rows * block * _split(cfg.num_heads, t) * cache_len * 4  # one layer's attention scores
    act += rows * block * 2 * _split(cfg.intermediate_size, t) * 4  # one layer's MLP
    act += 2 * cfg.num_layers * rows * block * _split(cfg.num_kv_heads, t) * cfg.head_dim * cache_bytes
    if dcfg is not None:
        act += cfg.num_layers * rows * block * d * 4  # target features for the drafter
        act += rows * block * _split(dcfg.out_vocab_size, t) * 4  # draft logits
    return MemoryPlan(data=data, model=model, capacity=capacity, weights=target_weight_bytes(cfg, t, dtype_bytes),
                      drafter=drafter_weight_bytes(dcfg, t, dtype_bytes), kv_cache=kv, drafter_cache=dcache,
                      activations=act)


def _auto(v) -> bool:
    return v in (None, "auto")


def choose_layout(cfg, dcfg=None, *, chips: int, capacity: int, batch_size: int, cache_len: int,
                  data_parallel: int | str = "auto", tensor_parallel: int | str = "auto", where: str = "",
                  **plan_kw) -> MemoryPlan:
    """The D x T layout for a job on ``chips`` chips of ``capacity`` bytes, as a plan that fits.

    ``auto`` tensor parallel is the smallest degree that splits the heads and fits; ``auto``
    data parallel takes the remaining chips. Raises ``LayoutError`` naming the setting to
    change and what would work. ``where`` names the chips in messages (e.g. "tpu v5e 2x2").
    """
    where = where or f"{chips} chip{'s' * (chips != 1)}"
    legal = legal_tensor_parallel(cfg, dcfg, chips)
    for name, v in (("data_parallel", data_parallel), ("tensor_parallel", tensor_parallel)):
        if not _auto(v) and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise LayoutError(name, f"{name} must be 'auto' or a positive integer, got {v!r}")
    if not _auto(tensor_parallel):
        problems = tensor_parallel_problems(tensor_parallel, cfg, dcfg)
        if problems:
            raise LayoutError("tensor_parallel", f"tensor_parallel {tensor_parallel} cannot split the model: "
                              f"{'; '.join(problems)}; degrees that can: {legal}")
    if not _auto(data_parallel) and not _auto(tensor_parallel) and data_parallel * tensor_parallel > chips:
        raise LayoutError("tensor_parallel" if tensor_parallel > 1 else "data_parallel",
                          f"data_parallel {data_parallel} x tensor_parallel {tensor_parallel} = "
                          f"{data_parallel * tensor_parallel} chips, but {where} has {chips}")
    candidates = legal if _auto(tensor_parallel) else [tensor_parallel]
    tried = []
    for t in candidates:
        if _auto(data_parallel):
            d = chips // t
        else:
            d = data_parallel
        if d < 1 or d * t > chips:
            if not _auto(tensor_parallel) or not _auto(data_parallel):
                raise LayoutError("data_parallel" if not _auto(data_parallel) else "tensor_parallel",
                                  f"data_parallel {d} x tensor_parallel {t} needs {d * t} chips, but {where} "
                                  f"has {chips}")
            continue
        if batch_size % d:
            how = "" if not _auto(data_parallel) else f" ({where} / tensor_parallel {t})"
            raise LayoutError("batch_size", f"batch_size {batch_size} is not divisible by data_parallel {d}{how}: "
                              f"use a multiple of {d}, or set data_parallel")
        p = plan(cfg, dcfg, batch_size=batch_size, cache_len=cache_len, data=d, model=t, capacity=capacity,
                 **plan_kw)
        if p.fits:
            return p
        tried.append(p)
    worst = tried[-1] if tried else None
    need = f" (data {worst.data} x model {worst.model} needs {worst.total / GB:.1f} GB per chip)" if worst else ""
    fixed_t = not _auto(tensor_parallel)
    advice = "a larger topology, a smaller batch_size" + (
        ", or a larger tensor_parallel" if fixed_t and any(t > tensor_parallel for t in legal) else "")
    setting = "tensor_parallel" if fixed_t and any(t > tensor_parallel for t in legal) else "topology"
    raise LayoutError(setting, f"the model does not fit {where} at batch_size {batch_size}{need}; "
                      f"{USABLE:.0%} of {capacity / GB:.0f} GB per chip is usable: use {advice}")


def chip_count(topology: str) -> int:
    """Chips in a TPU topology such as ``2x2`` or ``2x2x1``."""
    return math.prod(int(x) for x in topology.lower().split("x"))


def local_capacity() -> int:
    """Bytes per local device: the runtime's limit where it reports one (TPU, GPU), else (CPU)
    the host's memory shared by its devices."""
    import os

    import jax

    devices = jax.local_devices()
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(devices)


def memory_table(models: dict, slices: list[tuple[str, str, int]], batch_size: int, cache_len: int,
                 dtypes: tuple[tuple[str, int], ...] = (("float32", 4), ("bfloat16", 2))) -> str:
    """A markdown table of ``choose_layout`` per model and TPU slice: the D x T chosen and the GB per
    chip, for each weight/cache dtype. ``models``: name -> (TargetConfig, DrafterConfig or None);
    ``slices``: (label, chip generation, chips)."""
    head = "| model | slice | " + " | ".join(f"{name}: D x T, GB per chip" for name, _ in dtypes) + " |"
    lines = [head, "|---|---|" + "---|" * len(dtypes)]
    for name, (cfg, dcfg) in models.items():
        for label, gen, chips in slices:
            cells = []
            for _, nbytes in dtypes:
                kw = dict(batch_size=batch_size, cache_len=cache_len, dtype_bytes=nbytes, cache_bytes=nbytes,
                          block=dcfg.block_size if dcfg is not None else 1)
                try:
                    p = choose_layout(cfg, dcfg, chips=chips, capacity=HBM_PER_CHIP[gen], **kw)
                    cells.append(f"{p.data} x {p.model}, {p.total / GB:.1f} of {HBM_PER_CHIP[gen] / GB:.0f}")
                except LayoutError:
                    t = max(legal_tensor_parallel(cfg, dcfg, chips))
                    p = plan(cfg, dcfg, data=chips // t, model=t, capacity=HBM_PER_CHIP[gen], **kw)
                    cells.append(f"does not fit ({p.data} x {p.model} needs {p.total / GB:.1f})")
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
