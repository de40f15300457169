"""The memory plan: what one chip holds for a decode job, and the mesh layout that fits.

Per chip, for a mesh of D (data) x T (model) chips (layouts as in ``_mesh``), in the job's
dtype (``dtype``: the weights' element type, and the caches' where their constructors take it):
  * weights: the target's, sharded parameters / T, the rest whole;
  * drafter: its layers / T; ``fc``, norms, mask embedding and d2t whole (it borrows the
    target's embedding and lm_head, counted once under weights);
  * the slot state of ONE bucket, the largest: a decoder holds one state at a time (the bucket
    that ran last; ``_engine.StateHolder``), and warmup drops its own state before it makes the
    batch's, so its peak is one state too. The state is the decoder's own constructor
    (``_state.new_state``) traced without allocating, so its shapes, cache length (the largest
    bucket rounded up to whole ``prefill_chunk`` tokens, plus ``max_new_tokens``) and dtypes are
    what the decoder allocates. It is reported in three parts: kv_cache (the target's K/V),
    drafter_cache (the drafter's context K/V and the token history) and slots (the rest);
  * activations: the largest working set of one verify pass at the largest block length L,
    counted in float32: the logits [B/D, L, V/T] and, for sampling, two gathered [B/D, L, V]
    copies (sort); one layer's attention scores [B/D, L, N/T, S] and MLP [B/D, L, 2F/T]; every
    layer's new K/V and the collected features. An estimate, not XLA's exact allocation;
    ``USABLE`` leaves a margin for the runtime and XLA's temporaries.

Weights and state are ``held`` (allocated from load to exit); activations live only inside a
call. ``choose_layout`` picks D x T: the smallest tensor-parallel degree that splits the heads
and fits, the remaining chips to data parallel (a verify step is compute-bound, and tensor
parallelism costs an all-reduce per layer), or checks the degrees a job fixed. A job that fits
nowhere is refused with what would fit: another dtype, batch size, completion length or
prompt buckets.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from dflash_batch.decoder._decode_config import DecodeConfig
from dflash_batch.decoder._mesh import legal_tensor_parallel, tensor_parallel_problems
from dflash_batch.decoder._state import cache_length, decode_blocks, state_bytes

GB = 10**9
HBM_PER_CHIP = {"v5e": 16 * GB, "v6e": 32 * GB, "v5p": 95 * GB}  # Google's published HBM per chip
USABLE = 0.9  # share of a chip's memory the plan may fill
ACTIVATION_BYTES = 4  # the verify pass's working set is counted in float32 (an upper bound in bf16)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per chip of a decode job on a D x T mesh of chips with ``capacity`` bytes each.

    ``cache_rows``: cache rows per slot of the largest bucket, the state the plan counts;
    ``dtype``: the weights' element type; ``cache_dtype``: the KV cache's, as allocated.
    """

    data: int
    model: int
    capacity: int
    dtype: str
    cache_dtype: str
    cache_rows: int
    weights: int
    drafter: int
    kv_cache: int
    drafter_cache: int
    slots: int
    activations: int

    @property
    def held(self) -> int:
        """What stays allocated while the decoder lives: weights and one bucket's state."""
        return self.weights + self.drafter + self.kv_cache + self.drafter_cache + self.slots

    @property
    def total(self) -> int:
        return self.held + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= USABLE * self.capacity

    def lines(self) -> list[str]:
        """The plan as a dry run prints it."""
        gb = lambda n: f"{n / GB:.2f} GB"  # noqa: E731
        return [
            f"mesh: data {self.data} x model {self.model}",
            f"per chip: weights {gb(self.weights)}, drafter {gb(self.drafter)}, KV cache {gb(self.kv_cache)}, "
            f"drafter context {gb(self.drafter_cache)}, slots {gb(self.slots)}, activations {gb(self.activations)}",
            f"weights in {self.dtype}, KV cache in {self.cache_dtype}; one bucket's state at a time, the "
            f"largest: {self.cache_rows} cache rows per slot",
            f"total {gb(self.total)} of {gb(self.capacity)} per chip ({USABLE:.0%} usable): "
            + ("fits" if self.fits else "does NOT fit"),
        ]


class LayoutError(ValueError):
    """A mesh layout that cannot work; ``setting`` names what to change (``data_parallel``,
    ``tensor_parallel``, ``batch_size``, ``dtype``, ``max_new_tokens``, ``prompt_buckets`` or
    ``topology``).

    A job that does not fit memory also lists ``options``: (setting, value) for each single
    change that would fit, the preferred first (``setting`` is its first); ``problem`` is the
    message without them, so that callers can name the settings in their own terms.
    """

    def __init__(self, setting: str, problem: str, options: list[tuple[str, str]] = ()):
        self.problem, self.options = problem, list(options)
        shown = "; ".join("a larger topology" if name == "topology" else f"{name} {value}" for name, value in options)
        super().__init__(problem + (f". What fits: {shown}" if options else ""))
        self.setting = setting


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


def _in_dtype(cfg, dtype: str):
    """The config as loaded in ``dtype``. Configs that carry their dtype make the caches'
    constructors allocate in it; a config without one is the dtype-free config of a decoder whose
    caches do not follow the weights, and stays as it is."""
    if cfg is not None and any(f.name == "dtype" for f in dataclasses.fields(cfg)):
        return dataclasses.replace(cfg, dtype=dtype)
    return cfg


def plan(cfg, dcfg=None, *, decode: DecodeConfig, dtype: str = "float32", data: int = 1, model: int = 1,
         capacity: int, sampling: bool = True) -> MemoryPlan:
    """Per-chip bytes of a decoder for ``decode`` on a ``data`` x ``model`` mesh, its weights in
    ``dtype`` (see the module docstring for what each figure counts).

    ``dcfg``: the drafter's config (drafter modes; ignored by the others). ``sampling``: whether
    rows may sample (top-p sorts a gathered copy of the logits).
    """
    itemsize = jnp.dtype(dtype).itemsize
    dcfg = dcfg if decode.mode in ("dflash", "hybrid") else None
    bucket, t = max(decode.prompt_buckets), model
    state, cache_dtype = state_bytes(_in_dtype(cfg, dtype), _in_dtype(dcfg, dtype), decode, bucket, data, model)
    block = max(decode_blocks(decode, dcfg.block_size if dcfg is not None else None))
    rows, s = -(-decode.batch_size // data), cache_length(bucket, decode)
    v, d, n = cfg.vocab_size, cfg.hidden_size, ACTIVATION_BYTES
    act = rows * block * _split(v, t) * n  # verify logits
    if sampling:
        act += 2 * rows * block * v * n  # gathered and sorted for top-p
    act += rows * block * _split(cfg.num_heads, t) * s * n  # one layer's attention scores
    act += rows * block * 2 * _split(cfg.intermediate_size, t) * n  # one layer's MLP
    act += 2 * cfg.num_layers * rows * block * _split(cfg.num_kv_heads, t) * cfg.head_dim * n  # new K/V
    if dcfg is not None:
        act += cfg.num_layers * rows * block * d * n  # target features for the drafter
        act += rows * block * _split(dcfg.out_vocab_size, t) * n  # draft logits
    return MemoryPlan(data=data, model=model, capacity=capacity, dtype=str(jnp.dtype(dtype)),
                      cache_dtype=cache_dtype, cache_rows=s,
                      weights=target_weight_bytes(cfg, t, itemsize), drafter=drafter_weight_bytes(dcfg, t, itemsize),
                      kv_cache=state["kv_cache"], drafter_cache=state["context"], slots=state["slots"],
                      activations=act)


def _auto(v) -> bool:
    return v in (None, "auto")


def _first_fit(cfg, dcfg, *, chips: int, capacity: int, decode: DecodeConfig, dtype: str, where: str,
               sampling: bool) -> tuple[MemoryPlan | None, list[MemoryPlan]]:
    """The first layout that fits (None if none does) and the plans tried that did not; raises
    LayoutError for degrees that cannot work at all, whatever the memory."""
    data_parallel, tensor_parallel = decode.data_parallel, decode.tensor_parallel
    legal = legal_tensor_parallel(cfg, dcfg, chips)
    if not _auto(tensor_parallel):
        problems = tensor_parallel_problems(tensor_parallel, cfg, dcfg)
        if problems:
            raise LayoutError("tensor_parallel", f"tensor_parallel {tensor_parallel} cannot split the model: "
                              f"{'; '.join(problems)}; degrees that can: {legal}")
    if not _auto(data_parallel) and not _auto(tensor_parallel) and data_parallel * tensor_parallel > chips:
        raise LayoutError("tensor_parallel" if tensor_parallel > 1 else "data_parallel",
                          f"data_parallel {data_parallel} x tensor_parallel {tensor_parallel} = "
                          f"{data_parallel * tensor_parallel} chips, but {where} has {chips}")
    tried = []
    for t in legal if _auto(tensor_parallel) else [tensor_parallel]:
        d = chips // t if _auto(data_parallel) else data_parallel
        if d < 1 or d * t > chips:
            if not _auto(tensor_parallel) or not _auto(data_parallel):
                raise LayoutError("data_parallel" if not _auto(data_parallel) else "tensor_parallel",
                                  f"data_parallel {d} x tensor_parallel {t} needs {d * t} chips, but {where} "
                                  f"has {chips}")
            continue
        if decode.batch_size % d:
            how = "" if not _auto(data_parallel) else f" ({where} / tensor_parallel {t})"
            raise LayoutError("batch_size", f"batch_size {decode.batch_size} is not divisible by data_parallel "
                              f"{d}{how}: use a multiple of {d}, or set data_parallel")
        p = plan(cfg, dcfg, decode=decode, dtype=dtype, data=d, model=t, capacity=capacity, sampling=sampling)
        if p.fits:
            return p, tried
        tried.append(p)
    return None, tried


def choose_layout(cfg, dcfg=None, *, chips: int, capacity: int, decode: DecodeConfig, dtype: str = "float32",
                  where: str = "", sampling: bool = True) -> MemoryPlan:
    """The D x T layout for a decoder of ``decode`` (its data_parallel and tensor_parallel
    included) on ``chips`` chips of ``capacity`` bytes, as a plan that fits.

    ``auto`` tensor parallel is the smallest degree that splits the heads and fits; ``auto``
    data parallel takes the remaining chips. Raises ``LayoutError`` naming the setting to
    change and what would fit. ``where`` names the chips in messages (e.g. "tpu v5e 2x2").
    """
    where = where or f"{chips} chip{'s' * (chips != 1)}"
    kw = dict(chips=chips, capacity=capacity, where=where, sampling=sampling)
    found, tried = _first_fit(cfg, dcfg, decode=decode, dtype=dtype, **kw)
    if found is not None:
        return found
    worst = tried[-1] if tried else None
    need = f" (data {worst.data} x model {worst.model} needs {worst.total / GB:.1f} GB per chip)" if worst else ""
    options = _what_fits(cfg, dcfg, decode, dtype, legal_tensor_parallel(cfg, dcfg, chips), kw)
    options.append(("topology", "larger"))
    raise LayoutError(options[0][0], f"the model does not fit {where} at batch_size {decode.batch_size} in "
                      f"{jnp.dtype(dtype)}{need}; {USABLE:.0%} of {capacity / GB:.0f} GB per chip is usable",
                      options)


def _what_fits(cfg, dcfg, decode: DecodeConfig, dtype: str, legal: list[int], kw: dict) -> list[tuple[str, str]]:
    """(setting, what to set it to) for each single change that makes the job fit, most
    preferable first: bfloat16 (what TPUs compute in), a larger fixed tensor_parallel, then the
    largest batch_size, max_new_tokens and prompt buckets that fit, each halved until it does."""

    def fits(decode=decode, dtype=dtype) -> MemoryPlan | None:
        try:
            return _first_fit(cfg, dcfg, decode=decode, dtype=dtype, **kw)[0]
        except LayoutError:  # e.g. a batch the data-parallel degree does not divide
            return None

    out = []
    if jnp.dtype(dtype) != jnp.bfloat16 and (p := fits(dtype="bfloat16")):
        out.append(("dtype", f"bfloat16 (data {p.data} x model {p.model}, {p.total / GB:.1f} GB per chip)"))
    if not _auto(decode.tensor_parallel):
        for u in (u for u in legal if u > decode.tensor_parallel):
            if p := fits(decode.replace(tensor_parallel=u)):
                out.append(("tensor_parallel", f"{u} ({p.total / GB:.1f} GB per chip)"))
                break
    for name in ("batch_size", "max_new_tokens"):
        value = getattr(decode, name) // 2
        while value >= 1 and not fits(decode.replace(**{name: value})):
            value //= 2
        if value >= 1:
            out.append((name, str(value)))
    buckets = decode.prompt_buckets[:-1]
    while buckets and not fits(decode.replace(prompt_buckets=buckets)):
        buckets = buckets[:-1]
    if buckets:
        out.append(("prompt_buckets", f"{list(buckets)} (longer prompts become dead letters)"))
    return out


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
