"""Online training: the frozen target runs inside the training step, so nothing per token goes to disk.

A feature cache costs ~5.8 KB per token for SmolLM2 (58 GB for 10M tokens); on an accelerator
the target's forward over a batch is cheap next to that disk traffic, and it lets the data set
grow without bound. The step computes exactly what the cache would have held:
  1. one target pass over the batch's [prompt ; response] tokens [B, S], collecting the
     outputs of ``layer_ids`` and of the last layer;
  2. context features: the collected layers, rounded to fp16 as the cache stores them;
  3. the target's top-k next-token distribution only at the rows the labels need
     (``label_rows``), rounded to fp16 as the cache stores it;
  4. the soft labels of ``_blocks.draft_soft_labels``, the same rule the offline batch uses;
  5. the output head's input at those rows, rounded to fp16 as the cache stores it.
Everything is under ``stop_gradient``: the target is frozen.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dflash_batch.decoder._config import TargetConfig
from dflash_batch.decoder._target import Params, final_norm, hidden_states, lm_head
from dflash_batch.decoder.train._blocks import draft_soft_labels
from dflash_batch.decoder.train._data import PackedSequences, Sample


@dataclasses.dataclass
class TokenSequences(PackedSequences):
    """Training sequences without target outputs: what online training reads.
    Sequence i spans tokens offsets[i]:offsets[i+1] (the same layout as a ``FeatureCache``)."""

    ids: list[str]
    tokens: np.ndarray  # [N] int32
    offsets: np.ndarray  # [n + 1] int64
    prompt_lens: np.ndarray  # [n] int32

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> "TokenSequences":
        if not samples:
            raise ValueError("no training samples")
        lens = np.array([len(s.token_ids) for s in samples], np.int64)
        return cls(ids=[s.id for s in samples], tokens=np.concatenate([s.token_ids for s in samples]).astype(np.int32),
                   offsets=np.concatenate([[0], np.cumsum(lens)]),
                   prompt_lens=np.array([len(s.prompt_ids) for s in samples], np.int32))


def _target_pass(params: Params, cfg: TargetConfig, tokens: jax.Array, layer_ids: tuple[int, ...]) -> jax.Array:
    """hidden [B, S, len(layer_ids) + 1, D]: the collected layers, then the last layer's output."""
    return hidden_states(params, cfg, tokens, layer_ids + (cfg.num_layers - 1,))


def target_outputs(params: Params, cfg: TargetConfig, batch: dict, *, layer_ids: tuple[int, ...], top_k: int,
                   t2d: jax.Array | None) -> dict[str, jax.Array]:
    """feats [B, S, n_f, D] fp16, soft_ids / soft_probs [B, A, L-1, k] and head_in [B, A, L-1, D]
    fp16 of a ``make_token_batch`` batch: what ``make_batch`` reads from a cache, computed in the step.
    ``top_k`` 0 leaves out the soft labels (a full-distribution teacher needs no top-k of the whole head)."""
    params = jax.lax.stop_gradient(params)
    hidden = _target_pass(params, cfg, batch["tokens"], layer_ids)  # [B, S, n_f + 1, D]
    b, a, l1 = batch["label_rows"].shape
    rows = batch["label_rows"].reshape(b, a * l1)
    h = jnp.take_along_axis(hidden[:, :, -1], rows[..., None], axis=1)  # [B, A*(L-1), D]
    head_in = final_norm(params, cfg, h)
    out = {"feats": hidden[:, :, :-1].astype(jnp.float16), "head_in": head_in.astype(jnp.float16).reshape(b, a, l1, -1)}
    if top_k:
        logits = lm_head(params, head_in).astype(jnp.float32)  # [B, A*(L-1), V]
        vals, ids = jax.lax.top_k(logits, top_k)  # [B, A*(L-1), k]
        probs = jnp.exp(vals - jax.nn.logsumexp(logits, axis=-1, keepdims=True)).astype(jnp.float16)
        out["soft_ids"], out["soft_probs"] = draft_soft_labels(
            ids.reshape(b, a, l1, top_k), probs.reshape(b, a, l1, top_k), batch["label_exists"], t2d, xp=jnp)
    return jax.lax.stop_gradient(out)


def feature_scale(params: Params, cfg: TargetConfig, data: TokenSequences, layer_ids: Sequence[int], *,
                  max_sequences: int = 64, length_step: int = 64) -> np.ndarray:
    """Per-channel RMS [n_f, D] of the context features over the first ``max_sequences``
    sequences (the cache computes it over all of them; a sample estimates it well, and the
    trainer only needs its order of magnitude per channel)."""
    layer_ids = tuple(int(i) for i in layer_ids)
    run = jax.jit(_target_pass, static_argnames=("cfg", "layer_ids"))
    acc = np.zeros((len(layer_ids), cfg.hidden_size), np.float64)
    rows = 0
    for i in range(min(len(data), max_sequences)):
        toks = data.tokens[data.rows(i)]
        padded = np.zeros((1, -(-len(toks) // length_step) * length_step), np.int32)
        padded[0, : len(toks)] = toks
        h = np.asarray(jax.device_get(run(params, cfg, padded, layer_ids)), np.float64)[0, : len(toks), :-1]
        h = h.astype(np.float16).astype(np.float64)  # as the cache would store them
        acc += (h * h).sum(axis=0)
        rows += len(toks)
    return np.sqrt(acc / max(rows, 1)).astype(np.float32)
