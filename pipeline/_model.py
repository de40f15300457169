"""The model on a worker: loaded once per process, shared by every bundle and thread.

Why a module-level cache and not ``apache_beam.utils.shared.Shared``: ``Shared`` holds its
object through a weak reference and keeps only the *most recently acquired* object alive, so
with two shared objects per process (tokenizer and decoder) either can be dropped and reloaded
whenever the runner discards the DoFn instances that hold it. A model load plus XLA compilation
costs seconds to minutes; it must happen once per worker process, never per bundle or thread.
A dictionary keyed by everything that shapes the compiled programs (``ModelKey``) gives exactly
that, and also lets several jobs in one process (tests, benchmarks) reuse a compiled decoder.

Threads: a worker may run bundles on several threads. Decoding holds ``LoadedModel.lock``, so
one batch at a time uses the decoder's static slots. One decoder spans every chip of the
process, on a data x model mesh (``layout``); on TPU only one process may own the chips, hence
one SDK process per worker.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import Any, Callable

from dflash_batch.decoder import DRAFTER_MODES, DecodeConfig, Decoder, DrafterConfig, MemoryPlan, TargetConfig, \
    choose_layout, describe, enable_compilation_cache, load_drafter, load_target, local_capacity, \
    make_mesh, resolve_drafter_dir, resolve_dtype, resolve_model_dir

_lock = threading.Lock()
_models: dict["ModelKey", "LoadedModel"] = {}
_tokenizers: dict[str, tuple[Any, threading.Lock]] = {}


@dataclasses.dataclass(frozen=True)
class ModelKey:
    """Everything that changes what a process compiles for a job."""

    model: str
    drafter: str | None
    decode: DecodeConfig
    dtype: str | None = None  # the resolved dtype (job_dtype); None: the process's float32 default

    def __post_init__(self):
        # Only the decoder's own settings: a job's [decode] also holds per-row sampling defaults,
        # which change no compiled program, so jobs differing only there share the model.
        base = {f.name: getattr(self.decode, f.name) for f in dataclasses.fields(DecodeConfig)}
        object.__setattr__(self, "decode", DecodeConfig(**base))


@dataclasses.dataclass
class LoadedModel:
    decoder: Decoder
    lock: threading.Lock
    load_seconds: float
    hardware: str
    warm: set[int] = dataclasses.field(default_factory=set)  # buckets compiled (the decode step keeps it)


def model_configs(model: str, drafter: str | None, mode: str) -> tuple[TargetConfig, DrafterConfig | None]:
    """The target's and (drafter modes) the drafter's configs, from their config.json files only."""
    from dflash_batch.pipeline._io import join, read_json

    def read(location: str) -> dict:
        cfg = read_json(join(location, "config.json")) if location.startswith("gs://") else \
            json.loads((resolve_model_dir(location) / "config.json").read_text())
        if cfg is None:
            raise ValueError(f"{location!r} has no config.json")
        return cfg

    tcfg = TargetConfig.from_hf(read(model))
    dcfg = None
    if mode in DRAFTER_MODES:
        location = drafter if drafter and drafter.startswith("gs://") else str(resolve_drafter_dir(drafter, model))
        dcfg = DrafterConfig.from_hf(read(location))
    return tcfg, dcfg


def layout(key: ModelKey, chips: int | None = None, capacity: int | None = None, where: str = "",
           tcfg=None, dcfg=None, dtype: str | None = None) -> MemoryPlan:
    """The mesh layout (and memory plan) of a job on ``chips`` chips of ``capacity`` bytes (default:
    this process's devices), its model in ``dtype`` (default: the key's resolved dtype); LayoutError
    names the setting to change."""
    import jax

    if tcfg is None:
        tcfg, dcfg = model_configs(key.model, key.drafter, key.decode.mode)
    if chips is None:
        chips, capacity = len(jax.local_devices()), local_capacity()
        where = where or describe_devices()
    return choose_layout(tcfg, dcfg, chips=chips, capacity=capacity, decode=key.decode,
                         dtype=dtype or key.dtype or "float32", where=where)


def describe_devices() -> str:
    import jax

    devices = jax.local_devices()
    return f"{jax.default_backend()} x{len(devices)}"


def _load(key: ModelKey) -> LoadedModel:
    t0 = time.perf_counter()
    enable_compilation_cache()
    p = layout(key)  # refuses a layout the local devices cannot hold before anything loads
    mesh = make_mesh(p.data, p.model)
    target = load_target(key.model, dtype=p.dtype, mesh=mesh)  # the dtype the plan counted
    drafter = None
    if key.decode.mode in DRAFTER_MODES:
        drafter = load_drafter(resolve_drafter_dir(key.drafter, key.model), dtype=p.dtype, mesh=mesh)
    decoder = Decoder(target, key.decode, drafter)
    return LoadedModel(decoder, threading.Lock(), time.perf_counter() - t0, describe(mesh))


def shared_model(key: ModelKey, before_load: Callable[[], None] | None = None) -> tuple[LoadedModel, bool]:
    """The process's decoder for ``key`` and whether this call loaded it (``before_load`` is
    called first when it does, e.g. to show progress)."""
    with _lock:  # held while loading: other threads need the same model and must wait for it
        if key in _models:
            return _models[key], False
        if before_load is not None:
            before_load()
        _models[key] = _load(key)
        return _models[key], True


def shared_tokenizer(model: str) -> tuple[Any, threading.Lock]:
    """The model's tokenizer, loaded once per process, with a lock (fast tokenizers are not
    safe to call from several threads at once)."""
    with _lock:
        if model not in _tokenizers:
            from transformers import AutoTokenizer

            _tokenizers[model] = (AutoTokenizer.from_pretrained(str(resolve_model_dir(model))), threading.Lock())
        return _tokenizers[model]


def check_drafter(model: str, drafter: str | None) -> str:
    """The drafter location for mode dflash, checked without downloading it; ValueError otherwise.

    ``default`` is the drafter shipped for ``model`` (``decoder/drafters/<model>/``), resolved by
    the decoder's registry; a gs:// drafter is only checked for its config.json here.
    """
    if drafter in (None, "", "none"):
        raise ValueError("decode mode 'dflash' needs a drafter; set model.drafter (or use decode.mode = 'ar')")
    if drafter.startswith("gs://"):
        return drafter
    return str(resolve_drafter_dir(drafter, model))


def drafter_block_size(location: str) -> int:
    """The draft block size in a drafter's config.json (read through Beam's FileSystems)."""
    from dflash_batch.pipeline._io import join, read_json

    cfg = read_json(join(location, "config.json"))
    if cfg is None:
        raise ValueError(f"drafter {location!r} has no config.json")
    return DrafterConfig.from_hf(cfg).block_size


def model_config_exists(model: str) -> dict:
    """The model's config.json, or ValueError naming ``model`` when it cannot be a checkpoint
    (before any work starts).

    Local folders and registered names are resolved here (a registered model is imported into
    the cache once); of a gs:// model only its config.json is read, nothing downloaded.
    """
    if model.startswith("gs://"):
        from dflash_batch.pipeline._io import join, read_json

        config = read_json(join(model, "config.json"))
        if config is None:
            raise ValueError(f"model {model!r} has no config.json (not a checkpoint folder)")
        return config
    try:
        folder = resolve_model_dir(model)
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise ValueError(str(e)) from None
    return json.loads((folder / "config.json").read_text())


def job_dtype(spec: Any, checkpoint: dict | None = None) -> str:
    """The dtype a job's model is loaded in: its ``[model] dtype``, with "auto" resolved for the
    workers that will run it (``decoder.resolve_dtype``): a Dataflow job's workers are TPU hosts,
    a local job runs on this process's devices. ``checkpoint``: the target's config.json.
    Raises ``decoder.DtypeError``."""
    platform = "tpu" if spec.runner.name == "dataflow" else None
    return resolve_dtype(spec.model.dtype, checkpoint, platform)
