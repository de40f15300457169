"""The stages before training: responses, the held-out split, features and the draft vocabulary.

Each stage keeps its result in the run's work dir, so a rerun or a resumed call redoes
only what is missing; ``prepare`` runs them in order and returns what training needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dflash_batch.decoder._checkpoint import TargetModel
from dflash_batch.decoder._drafter_checkpoint import Drafter
from dflash_batch.decoder._drafter_config import DrafterConfig
from dflash_batch.decoder.train import _progress
from dflash_batch.decoder.train._config import DataConfig
from dflash_batch.decoder.train._data import Sample, generate_responses
from dflash_batch.decoder.train._features import FeatureCache, build_feature_cache
from dflash_batch.decoder.train._online import TokenSequences, feature_scale
from dflash_batch.decoder.train._vocab import coverage, select_draft_vocab, target_to_draft, token_counts

Prompts = Sequence[tuple[str, Sequence[int]]]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What training reads: the frozen prompt set, its responses and split, the sequences
    (with cached features offline), the features' scale and the draft vocabulary."""

    prompts: list[tuple[str, Sequence[int]]]
    samples: list[Sample]  # one per prompt, in prompt order
    train_idx: list[int]
    held_idx: list[int]
    seqs: FeatureCache | TokenSequences
    scale: np.ndarray  # [n_features, D] per-channel RMS of the target features
    d2t: np.ndarray | None  # [V'] target id of each draft id; None: the full vocabulary
    t2d: np.ndarray | None  # [V] draft id of each target id (-1: none)
    vocab: dict
    seconds: dict[str, float]  # of this call: responses, features
    timings: dict[str, float]  # summed over every call of the run


def split_prompts(ids: Sequence[str], n_eval: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a seeded choice of ``n_eval`` held-out prompts."""
    if n_eval >= len(ids):
        raise ValueError(f"{n_eval=} held-out prompts leave none of the {len(ids)} to train on")
    perm = np.random.default_rng([seed, 7]).permutation(len(ids))
    held = sorted(perm[:n_eval].tolist())
    return sorted(perm[n_eval:].tolist()), held


def prepare(target: TargetModel, prompts: Prompts, work_dir: Path, dcfg: DrafterConfig, base: Drafter | None,
            data: DataConfig, *, seed: int, top_k: int, online: bool, gen_deadline: float | None,
            progress: bool, log: Callable[[str], None]) -> Prepared:
    """Runs the stages before training, each cached in ``work_dir``:

    1. The target's greedy responses (``respond``); a generation deadline freezes the set
       of prompts answered, and later calls train on that same set.
    2. Hold out ``data.eval_prompts`` of them (seeded) for evaluation; train on the rest.
    3. The features (``featurize``): cached on disk offline, only their scale online.
    4. The draft vocabulary from the training responses (``choose_vocab``).
    """
    prompts, samples, gen_seconds = respond(target, prompts, work_dir, data, deadline=gen_deadline,
                                            progress=progress, log=log)
    train_idx, held_idx = split_prompts([p[0] for p in prompts], data.eval_prompts, seed)
    seqs, scale, feat_seconds = featurize(target, samples, work_dir, dcfg.target_layer_ids, top_k=top_k,
                                          online=online, progress=progress)
    timings = add_timings(work_dir / "timings.json", {"responses": gen_seconds, "features": feat_seconds})
    d2t, t2d, vocab = choose_vocab([s.response_ids for s in samples], train_idx, held_idx, dcfg, base,
                                   always=target.eos_token_ids)
    log(f"draft vocabulary {vocab}")
    return Prepared(list(prompts), samples, train_idx, held_idx, seqs, scale, d2t, t2d, vocab,
                    {"responses": gen_seconds, "features": feat_seconds}, timings)


def respond(target: TargetModel, prompts: Prompts, work_dir: Path, data: DataConfig, *, deadline: float | None,
            progress: bool, log: Callable[[str], None]) -> tuple[list, list[Sample], float]:
    """(the prompts trained on, their responses, seconds spent). Responses are cached in
    ``responses.jsonl``; the prompt set is frozen in ``prompt-set.json`` once generation
    ends, so a resumed call trains on the same data even if its budget would answer more."""
    t0 = time.perf_counter()
    frozen_path = work_dir / "prompt-set.json"
    source = hashlib.sha256(json.dumps([[i, list(map(int, t))] for i, t in prompts]).encode()).hexdigest()
    frozen = json.loads(frozen_path.read_text()) if frozen_path.exists() else {}
    if frozen.get("source") == source:
        keep = set(frozen["ids"])
        prompts = [p for p in prompts if p[0] in keep]
        deadline = None  # every prompt of the frozen set has its response already
    bar = _progress.bar(progress, len(prompts), "responses")
    samples = generate_responses(target, prompts, work_dir / "responses.jsonl", max_new_tokens=data.max_new_tokens,
                                 batch_size=data.gen_batch, mode=data.gen_mode, deadline=deadline,
                                 progress=lambda d, n, tps: _progress.tick(bar, d, tok_s=f"{tps:.1f}"))
    _progress.tick(bar, len(samples))
    _progress.close(bar)
    if frozen.get("source") != source:
        answered = {s.id for s in samples}
        frozen_path.write_text(json.dumps({"source": source, "ids": [p[0] for p in prompts if p[0] in answered],
                                           "of": len(prompts)}))
        if len(answered) < len(prompts):
            log(f"generation budget spent: training on {len(answered)} of {len(prompts)} prompts")
        prompts = [p for p in prompts if p[0] in answered]
    return list(prompts), samples, time.perf_counter() - t0


def featurize(target: TargetModel, samples: list[Sample], work_dir: Path, layer_ids: Sequence[int], *, top_k: int,
              online: bool, progress: bool) -> tuple[FeatureCache | TokenSequences, np.ndarray, float]:
    """(training sequences, the features' per-channel scale, seconds spent). Offline the
    target's features and top-k distributions are cached under ``features/``; online the
    training step computes them, and only their scale is estimated (``online_scale``)."""
    t0 = time.perf_counter()
    if online:
        seqs = TokenSequences.from_samples(samples)
        scale = online_scale(target, seqs, layer_ids, work_dir / "feature-scale.json")
    else:
        bar = _progress.bar(progress, len(samples), "features")
        seqs = build_feature_cache(target, samples, work_dir / "features", layer_ids, top_k=top_k,
                                   progress=lambda d, n: _progress.tick(bar, d))
        _progress.tick(bar, len(samples))
        _progress.close(bar)
        scale = seqs.scale
    return seqs, scale, time.perf_counter() - t0


def online_scale(target: TargetModel, seqs: TokenSequences, layer_ids: Sequence[int], path: Path) -> np.ndarray:
    """The features' per-channel RMS for online training, estimated once and kept in ``path``
    (keyed by the data and layers), so a resumed run standardises exactly as before."""
    key = hashlib.sha256(json.dumps([list(layer_ids), seqs.ids[:64]]).encode() + seqs.tokens[
        : int(seqs.offsets[min(64, len(seqs))])].tobytes()).hexdigest()
    if path.exists():
        rec = json.loads(path.read_text())
        if rec["key"] == key:
            return np.asarray(rec["scale"], np.float32)
    scale = feature_scale(target.params, target.config, seqs, layer_ids, max_sequences=64)
    path.write_text(json.dumps({"key": key, "scale": scale.tolist()}))
    return scale


def add_timings(path: Path, seconds: dict[str, float]) -> dict[str, float]:
    """Data preparation seconds summed over every call of the run that did some (kept in ``path``)."""
    timings = json.loads(path.read_text()) if path.exists() else {"responses": 0.0, "features": 0.0}
    timings = {k: timings[k] + seconds[k] for k in ("responses", "features")}
    path.write_text(json.dumps(timings))
    return timings


def choose_vocab(responses: list[np.ndarray], train_idx: list[int], held_idx: list[int], dcfg: DrafterConfig,
                 base: Drafter | None, *, always: Sequence[int]) -> tuple[np.ndarray | None, np.ndarray | None, dict]:
    """(d2t, t2d, a summary with the coverage of training and held-out responses): the
    ``dcfg.draft_vocab_size`` most frequent training tokens plus ``always`` (the EOS ids).
    A continued drafter keeps its vocabulary: its lm_head's columns are those tokens."""
    counts = token_counts([responses[i] for i in train_idx], dcfg.vocab_size)
    held_counts = token_counts([responses[i] for i in held_idx], dcfg.vocab_size)
    d2t = t2d = None
    if dcfg.draft_vocab_size is not None:
        d2t = (np.asarray(base.params["d2t"]) if base is not None else
               select_draft_vocab(counts, dcfg.draft_vocab_size, always=always))
        t2d = target_to_draft(d2t, dcfg.vocab_size)
    vocab = {"size": dcfg.out_vocab_size,
             "train_coverage": coverage(counts, d2t) if d2t is not None else 1.0,
             "heldout_coverage": coverage(held_counts, d2t) if d2t is not None else 1.0}
    return d2t, t2d, vocab
