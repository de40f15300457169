"""The frozen target's outputs over every training sequence, computed once and cached on disk.

Training reads the target only through this cache, so many epochs cost one target pass
per sequence. One jitted ``forward`` over [prompt ; response] gives both things the
trainer needs:
  * context features: the outputs of ``target_layer_ids`` at every position, fp16,
    [N, n_f, D] in one ``.npy`` file opened as a memory map (N = tokens of all sequences);
  * the target's next-token distribution at every position, as its top-k ids [N, k]
    int32 and probabilities [N, k] fp16, for distillation. Row t holds the distribution
    of token t+1, i.e. of the label a block drafts at position t+1;
  * the input of the target's output head at the same rows (its last layer after the
    final norm), [N, D] fp16: ~20% of the features' bytes, from which the trainer computes
    the target's whole distribution over the draft vocabulary (``TrainConfig.teacher``).
Per channel, the root mean square of the features is stored too (``scale`` [n_f, D]):
a few SmolLM2 channels carry activations of 100-500, and the trainer divides by it.

The cache is filled in sequence order and records how far it got, so an interrupted
extraction resumes. Its identity (sequence ids, token counts, layers, k) is checked on
reopening; a different training set gets a fresh cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dflash_batch.decoder._checkpoint import TargetModel
from dflash_batch.decoder._config import TargetConfig
from dflash_batch.decoder._target import Params, final_norm, hidden_states, lm_head
from dflash_batch.decoder.train._data import PackedSequences, Sample

LENGTH_STEP = 64  # sequences are padded to a multiple of this: few compiled shapes, little padding


@functools.partial(jax.jit, static_argnames=("cfg", "layer_ids", "top_k", "n_logits"))
def _extract(params: Params, tokens: jax.Array, logits_from: jax.Array, *, cfg: TargetConfig,
             layer_ids: tuple[int, ...], top_k: int, n_logits: int) -> tuple[jax.Array, ...]:
    """tokens [1, T] -> (features [T, n_f, D] fp16, top-k ids [R, k], top-k probs [R, k] fp16,
    head inputs [R, D] fp16, r0).

    The output head runs only on the R = ``n_logits`` rows from r0 = min(logits_from, T - R):
    the response's rows, where distillation needs distributions. Over a whole summarization
    prompt the 49k-row head would cost ~20% of the pass for rows nobody reads.
    """
    t = tokens.shape[1]
    hidden = hidden_states(params, cfg, tokens, layer_ids + (cfg.num_layers - 1,))  # [1, T, n_f + 1, D]
    r0 = jnp.clip(logits_from, 0, t - n_logits)
    h = jax.lax.dynamic_slice_in_dim(hidden[0, :, -1], r0, n_logits, axis=0)  # [R, D], after the last layer
    head_in = final_norm(params, cfg, h)
    logits = lm_head(params, head_in)  # [R, V]
    vals, ids = jax.lax.top_k(logits, top_k)  # [R, k]
    probs = jnp.exp(vals - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    return (hidden[0, :, :-1].astype(jnp.float16), ids.astype(jnp.int32), probs.astype(jnp.float16),
            head_in.astype(jnp.float16), r0)


@dataclasses.dataclass
class FeatureCache(PackedSequences):
    """Read access to a finished cache. Sequence i spans rows offsets[i]:offsets[i+1]."""

    folder: Path
    ids: list[str]
    tokens: np.ndarray  # [N] int32
    offsets: np.ndarray  # [n + 1] int64
    prompt_lens: np.ndarray  # [n] int32
    feats: np.ndarray  # [N, n_f, D] fp16 (memory map)
    topk_ids: np.ndarray  # [N, k] int32
    topk_probs: np.ndarray  # [N, k] fp16
    head_in: np.ndarray  # [N, D] fp16 (memory map): the output head's input, row t for token t+1
    scale: np.ndarray  # [n_f, D] float32, per-channel RMS of the features
    layer_ids: tuple[int, ...]


CACHE_FORMAT = 2  # 2: with head_in.npy


def _identity(samples: Sequence[Sample], layer_ids: tuple[int, ...], top_k: int, target_name: str) -> str:
    h = hashlib.sha256(json.dumps([target_name, list(layer_ids), top_k, CACHE_FORMAT]).encode())
    for s in samples:
        h.update(s.id.encode())
        h.update(s.token_ids.tobytes())
    return h.hexdigest()


def _reusable_prefix(folder: Path, meta: dict, samples: Sequence[Sample], layer_ids: tuple[int, ...], top_k: int,
                     target_name: str) -> int:
    """How many leading ``samples`` an existing cache already holds unchanged (0 if none)."""
    if not meta or (meta.get("layer_ids"), meta.get("top_k"), meta.get("target"), meta.get("format")) != (
            list(layer_ids), top_k, target_name, CACHE_FORMAT):
        return 0
    try:
        tokens, offsets = np.load(folder / "tokens.npy"), np.load(folder / "offsets.npy")
    except FileNotFoundError:
        return 0
    n = 0
    for i in range(min(meta["done"], len(samples), len(meta["ids"]))):
        if meta["ids"][i] != samples[i].id or not np.array_equal(tokens[offsets[i] : offsets[i + 1]],
                                                                  samples[i].token_ids):
            break
        n = i + 1
    return n


def build_feature_cache(target: TargetModel, samples: Sequence[Sample], folder: Path, layer_ids: Sequence[int],
                        top_k: int = 32, progress: Callable[[int, int], None] | None = None) -> FeatureCache:
    """Fills (or resumes) the cache of ``samples`` in ``folder`` and opens it.

    Each sequence is one target pass at its own length rounded up to ``LENGTH_STEP``
    (the causal mask makes the padded tail invisible to real rows). When the samples
    extend those of an existing cache (more prompts appended), the leading sequences'
    rows are copied over instead of recomputed.
    """
    layer_ids = tuple(int(i) for i in layer_ids)
    top_k = min(top_k, target.config.vocab_size)
    if not samples:
        raise ValueError("no training samples")
    if max(layer_ids) >= target.config.num_layers:
        raise ValueError(f"{layer_ids=} exceed the target's {target.config.num_layers=}")
    folder.mkdir(parents=True, exist_ok=True)
    ident = _identity(samples, layer_ids, top_k, str(target.path))
    lens = np.array([len(s.token_ids) for s in samples], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    n_rows, n_f, d = int(offsets[-1]), len(layer_ids), target.config.hidden_size
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    fresh = meta.get("identity") != ident
    reuse = _reusable_prefix(folder, meta, samples, layer_ids, top_k, str(target.path)) if fresh else 0
    mode = "w+" if fresh else "r+"
    suffix = ".new" if reuse else ""  # a grown cache is built beside the old one, then swapped in
    feats = np.lib.format.open_memmap(folder / f"feats.npy{suffix}", mode, np.float16, (n_rows, n_f, d))
    topk_ids = np.lib.format.open_memmap(folder / f"topk_ids.npy{suffix}", mode, np.int32, (n_rows, top_k))
    topk_probs = np.lib.format.open_memmap(folder / f"topk_probs.npy{suffix}", mode, np.float16, (n_rows, top_k))
    head_in = np.lib.format.open_memmap(folder / f"head_in.npy{suffix}", mode, np.float16, (n_rows, d))
    arrays = {"feats.npy": feats, "topk_ids.npy": topk_ids, "topk_probs.npy": topk_probs, "head_in.npy": head_in}
    if reuse:  # the data set grew (or changed at its end): keep the rows of its unchanged first sequences
        rows = int(offsets[reuse])
        for name, new in arrays.items():
            old = np.load(folder / name, mmap_mode="r")
            for a in range(0, rows, 65536):
                new[a : min(rows, a + 65536)] = old[a : min(rows, a + 65536)]
            new.flush()
            del old
            (folder / f"{name}.new").replace(folder / name)
    if fresh:
        meta = {"identity": ident, "done": reuse, "layer_ids": list(layer_ids), "top_k": top_k,
                "ids": [s.id for s in samples], "target": str(target.path), "format": CACHE_FORMAT}
        np.save(folder / "tokens.npy", np.concatenate([s.token_ids for s in samples]).astype(np.int32))
        np.save(folder / "offsets.npy", offsets)
        np.save(folder / "prompt_lens.npy", np.array([len(s.prompt_ids) for s in samples], np.int32))
        meta_path.write_text(json.dumps(meta))
    t_last = time.perf_counter()
    # One head length for all sequences (a multiple of LENGTH_STEP): one compile per padded length.
    n_logits = -(-max(len(s.response_ids) for s in samples) // LENGTH_STEP) * LENGTH_STEP
    for i in range(meta["done"], len(samples)):
        toks = samples[i].token_ids
        t = -(-max(len(toks), n_logits) // LENGTH_STEP) * LENGTH_STEP
        padded = np.zeros((1, t), np.int32)
        padded[0, : len(toks)] = toks
        p = len(samples[i].prompt_ids)
        f, ki, kp, hi, r0 = jax.device_get(_extract(target.params, padded, np.int32(p - 1), cfg=target.config,
                                                layer_ids=layer_ids, top_k=top_k, n_logits=n_logits))
        lo, n = int(offsets[i]), len(toks)
        feats[lo : lo + n] = f[:n]
        keep = slice(p - 1 - int(r0), n - 1 - int(r0))  # rows P-1..T-2 of the sequence
        topk_ids[lo + p - 1 : lo + n - 1], topk_probs[lo + p - 1 : lo + n - 1] = ki[keep], kp[keep]
        head_in[lo + p - 1 : lo + n - 1] = hi[keep]
        if i + 1 == len(samples) or time.perf_counter() - t_last > 30:  # record progress twice a minute
            for a in arrays.values():
                a.flush()
            meta["done"] = i + 1
            meta_path.write_text(json.dumps(meta))
            t_last = time.perf_counter()
        if progress is not None:
            progress(i + 1, len(samples))
    if "scale" not in meta:
        meta["scale"] = _channel_rms(feats).tolist()
        meta_path.write_text(json.dumps(meta))
    del feats, topk_ids, topk_probs, head_in, arrays
    return open_feature_cache(folder)


def _channel_rms(feats: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Per-channel root mean square [n_f, D] over all rows, in float64 chunks."""
    acc = np.zeros(feats.shape[1:], np.float64)
    for a in range(0, feats.shape[0], chunk):
        x = np.asarray(feats[a : a + chunk], np.float64)
        acc += (x * x).sum(axis=0)
    return np.sqrt(acc / max(feats.shape[0], 1)).astype(np.float32)


def open_feature_cache(folder: Path) -> FeatureCache:
    """Opens a finished cache (features memory-mapped, read-only)."""
    meta = json.loads((folder / "meta.json").read_text())
    if meta["done"] != len(meta["ids"]) or "scale" not in meta:
        raise ValueError(f"feature cache {folder} is incomplete ({meta['done']}/{len(meta['ids'])} sequences)")
    return FeatureCache(
        folder=folder, ids=list(meta["ids"]), tokens=np.load(folder / "tokens.npy"),
        offsets=np.load(folder / "offsets.npy"), prompt_lens=np.load(folder / "prompt_lens.npy"),
        feats=np.load(folder / "feats.npy", mmap_mode="r"), topk_ids=np.load(folder / "topk_ids.npy", mmap_mode="r"),
        topk_probs=np.load(folder / "topk_probs.npy", mmap_mode="r"), head_in=np.load(folder / "head_in.npy", mmap_mode="r"),
        scale=np.asarray(meta["scale"], np.float32), layer_ids=tuple(meta["layer_ids"]))
