"""``train_drafter``: prompts in, a z-lab format DFlash drafter out.

Steps (each cached in ``work_dir``, so a rerun or ``resume`` skips what is done):
  1. Hold out ``eval_prompts`` prompts (seeded) for evaluation; train on the rest.
  2. Generate the target's greedy responses to all prompts (``_data``), within a time
     budget if one is given.
  3. Offline: run the target once over every [prompt ; response] and cache its context
     features and top-k distributions (``_features``). Online: only estimate the
     features' scale; the training step runs the target itself (``_online``).
  4. Choose the draft vocabulary from the training responses (``_vocab``).
  5. Initialise the drafter from the target (``_init``), or continue a saved drafter
     (``DrafterSpec.init_drafter``: fine-tuning to a new domain), and train (``_loop``), with
     periodic tau evaluations through the real Decoder (``_eval``).
  6. Fold the feature standardisation into ``fc`` and save (``save_drafter``, bf16) the
     evaluated drafter with the best held-out decoder tau: a small data set is memorised
     late in a long run, and the last step is then not the best drafter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dflash_batch.decoder._checkpoint import TargetModel
from dflash_batch.decoder._registry import resolve_drafter_dir
from dflash_batch.decoder._drafter_checkpoint import Drafter, load_drafter, save_drafter
from dflash_batch.decoder._drafter_config import DrafterConfig, default_target_layer_ids
from dflash_batch.decoder._target import Params
from dflash_batch.decoder.train._data import generate_responses
from dflash_batch.decoder.train._eval import decode_tau
from dflash_batch.decoder.train._features import build_feature_cache
from dflash_batch.decoder.train._init import export_params, feature_inv_scale, init_params, params_from_drafter
from dflash_batch.decoder.train._loop import TrainConfig, Trainer, cast_floats, train_loop
from dflash_batch.decoder.train._online import TokenSequences, feature_scale
from dflash_batch.decoder.train._vocab import coverage, select_draft_vocab, target_to_draft, token_counts


SHIP_DTYPE = jnp.bfloat16  # what a trained drafter's weights are saved in


def as_shipped(dcfg: DrafterConfig, params: Params, dtype) -> Drafter:
    """The drafter a job would load from the shipped files: weights rounded to SHIP_DTYPE,
    then run in ``dtype`` (the target's). The tau reported during training is measured on
    it, not on the float32 training copy."""
    return Drafter(dataclasses.replace(dcfg, dtype=dtype), cast_floats(cast_floats(params, SHIP_DTYPE), dtype))


@dataclasses.dataclass(frozen=True)
class DrafterSpec:
    """What drafter to train: its shape, and the levers that start it off well."""

    num_layers: int = 1
    block_size: int = 16
    target_layer_ids: tuple[int, ...] | None = None  # None: 5 layers spread by z-lab's rule
    draft_vocab_size: int | None = 8192  # None: score the full target vocabulary
    mask_token_id: int | None = None  # None: the tokenizer's pad (else EOS) id, replaced by a learned embedding
    mask_embedding: bool = True
    init_from_target: bool = True
    source_layers: tuple[int, ...] | None = None  # target layers the draft layers copy; None: after the deepest feature
    standardize: bool = True
    intermediate_size: int | None = None  # None: the target's (required when initialising from it)
    # A saved drafter to continue training from (a folder, gs:// prefix, or "default": the one shipped
    # for the target): its shape, features and draft vocabulary replace every field above.
    init_drafter: str | None = None

    def layer_ids(self, num_target_layers: int) -> tuple[int, ...]:
        if self.target_layer_ids is not None:
            return tuple(int(i) for i in self.target_layer_ids)
        if num_target_layers < 8:
            return tuple(range(num_target_layers))
        return default_target_layer_ids(num_target_layers, max(self.num_layers, 5))


def drafter_config(spec: DrafterSpec, target: TargetModel) -> DrafterConfig:
    cfg = target.config
    mask_id = spec.mask_token_id
    if mask_id is None:
        tok = target.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        mask_id = pad if pad is not None else (target.eos_token_ids or (0,))[0]
        if not spec.mask_embedding:
            raise ValueError("without a learned mask embedding, name a mask_token_id the target never emits")
    return DrafterConfig(
        block_size=spec.block_size, mask_token_id=int(mask_id), target_layer_ids=spec.layer_ids(cfg.num_layers),
        num_layers=spec.num_layers, hidden_size=cfg.hidden_size,
        intermediate_size=spec.intermediate_size or cfg.intermediate_size, num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps, vocab_size=cfg.vocab_size, rope_scaling=cfg.rope_scaling,
        num_target_layers=cfg.num_layers, mask_embedding=spec.mask_embedding,
        draft_vocab_size=spec.draft_vocab_size)


def split_prompts(ids: Sequence[str], n_eval: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a seeded choice of ``n_eval`` held-out prompts."""
    if n_eval >= len(ids):
        raise ValueError(f"{n_eval=} held-out prompts leave none of the {len(ids)} to train on")
    perm = np.random.default_rng([seed, 7]).permutation(len(ids))
    held = sorted(perm[:n_eval].tolist())
    return sorted(perm[n_eval:].tolist()), held


def hardware() -> str:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    return f"{dev.platform}:{kind}, {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"


def train_drafter(target: TargetModel, prompts: Sequence[tuple[str, Sequence[int]]], out_dir: Path, *,
                  work_dir: Path, spec: DrafterSpec = DrafterSpec(), tcfg: TrainConfig = TrainConfig(),
                  max_new_tokens: int = 128, gen_batch: int = 8, gen_mode: str = "ar", eval_prompts: int = 16,
                  eval_max_new_tokens: int = 64, eval_batch: int = 8, resume: bool = False,
                  stop_at: int | None = None, progress: bool = True,
                  log: Callable[[str], None] = print, online: bool | None = None, mesh: Mesh | None = None,
                  gen_deadline: float | None = None, deadline: float | None = None) -> dict:
    """Trains a drafter for ``target`` on its own responses to ``prompts`` (id, token ids)
    and saves it to ``out_dir``. Returns a summary (data, compute, tau) for the model card.

    ``resume`` continues the checkpoint in ``work_dir`` (the same settings are required);
    ``stop_at`` ends this call after that step (the schedule still spans ``tcfg.steps``).
    ``online`` runs the target inside the training step instead of caching its features
    (default: online on an accelerator, offline on the CPU). ``mesh``: the device mesh whose
    ``data`` axis splits each batch (default: every device). Budgets, as ``time.time()``:
    ``gen_deadline`` ends response generation (training then uses the prompts answered, a
    set recorded in ``work_dir`` so later calls keep it), ``deadline`` ends training
    (checkpointed; the drafter so far is exported).
    """
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    online = jax.default_backend() != "cpu" if online is None else online
    base_dir = resolve_drafter_dir(spec.init_drafter, target.name) if spec.init_drafter else None
    base = load_drafter(base_dir) if base_dir is not None else None
    if base is not None:
        base.config.check_target(target.config)
    dcfg = base.config if base is not None else drafter_config(spec, target)

    # 2. Responses (the prompt set is frozen once generation ends, so a resumed call trains on the same data).
    t0 = time.perf_counter()
    frozen_path = work_dir / "prompt-set.json"
    source = hashlib.sha256(json.dumps([[i, list(map(int, t))] for i, t in prompts]).encode()).hexdigest()
    frozen = json.loads(frozen_path.read_text()) if frozen_path.exists() else {}
    if frozen.get("source") == source:
        keep = set(frozen["ids"])
        prompts = [p for p in prompts if p[0] in keep]
        gen_deadline = None  # every prompt of the frozen set has its response already
    bar = _bar(progress, len(prompts), "responses")
    samples = generate_responses(target, prompts, work_dir / "responses.jsonl", max_new_tokens=max_new_tokens,
                                 batch_size=gen_batch, mode=gen_mode,
                                 progress=lambda d, n, tps: _tick(bar, d, tok_s=f"{tps:.1f}"), deadline=gen_deadline)
    _tick(bar, len(samples))
    _close(bar)
    if frozen.get("source") != source:
        answered = {s.id for s in samples}
        frozen_path.write_text(json.dumps({"source": source, "ids": [p[0] for p in prompts if p[0] in answered],
                                           "of": len(prompts)}))
        if len(answered) < len(prompts):
            log(f"generation budget spent: training on {len(answered)} of {len(prompts)} prompts")
        prompts = [p for p in prompts if p[0] in answered]
    gen_seconds = time.perf_counter() - t0
    ids = [p[0] for p in prompts]
    train_idx, held_idx = split_prompts(ids, eval_prompts, tcfg.seed)

    # 3. Features: cached on disk (offline), or only their per-channel scale (online: the step computes them).
    t0 = time.perf_counter()
    if online:
        data = TokenSequences.from_samples(samples)
        scale = _online_scale(target, data, dcfg.target_layer_ids, work_dir / "feature-scale.json")
    else:
        bar = _bar(progress, len(samples), "features")
        data = build_feature_cache(target, samples, work_dir / "features", dcfg.target_layer_ids, top_k=tcfg.top_k,
                                   progress=lambda d, n: _tick(bar, d))
        _tick(bar, len(samples))
        _close(bar)
        scale = data.scale
    feat_seconds = time.perf_counter() - t0
    timings_path = work_dir / "timings.json"  # data preparation time summed over every call that did some
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {"responses": 0.0, "features": 0.0}
    timings = {"responses": timings["responses"] + gen_seconds, "features": timings["features"] + feat_seconds}
    timings_path.write_text(json.dumps(timings))

    # 4. Draft vocabulary.
    resp = [s.response_ids for s in samples]
    counts = token_counts([resp[i] for i in train_idx], dcfg.vocab_size)
    held_counts = token_counts([resp[i] for i in held_idx], dcfg.vocab_size)
    d2t = t2d = None
    if dcfg.draft_vocab_size is not None:  # a continued drafter keeps its vocabulary (its lm_head's columns)
        d2t = (np.asarray(base.params["d2t"]) if base is not None else
               select_draft_vocab(counts, dcfg.draft_vocab_size, always=target.eos_token_ids))
        t2d = target_to_draft(d2t, dcfg.vocab_size)
    vocab = {"size": dcfg.out_vocab_size,
             "train_coverage": coverage(counts, d2t) if d2t is not None else 1.0,
             "heldout_coverage": coverage(held_counts, d2t) if d2t is not None else 1.0}
    log(f"draft vocabulary {vocab}")

    # 5. Initialise and train.
    inv_scale = feature_inv_scale(scale, spec.standardize)
    if base is not None:
        params = params_from_drafter(base.params, inv_scale)
    else:
        params = init_params(dcfg, target.params, target.config, jax.random.PRNGKey(tcfg.seed), inv_scale=inv_scale,
                             d2t=d2t, from_target=spec.init_from_target, source_layers=spec.source_layers)
    trainer = Trainer(dcfg, target.params, data, tcfg, inv_scale=inv_scale, t2d=t2d,
                      target_config=target.config if online else None, mesh=mesh)
    held_prompts = [(ids[i], prompts[i][1]) for i in held_idx]

    identity = {"target": str(target.path), "drafter": dcfg.to_hf(), "spec": dataclasses.asdict(spec),
                "train": {k: v for k, v in dataclasses.asdict(tcfg).items()
                          if k not in ("checkpoint_every", "log_every", "eval_every")},
                "data": hashlib.sha256("".join(data.ids).encode() + data.tokens.tobytes()).hexdigest(),
                "held_out": held_idx, "online": online}
    run_id = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    best = BestDrafter(work_dir / "drafter-best", run_id)

    def evaluate(p: Params, step: int) -> dict:
        exported = export_params(p, inv_scale)
        # The latest evaluated drafter, usable while training goes on; ``out_dir`` is written
        # only when this call ends, so a shipped folder never holds an untrained drafter.
        save_drafter(work_dir / "drafter-latest", dcfg, exported)
        r = decode_tau(target, held_prompts, drafter=as_shipped(dcfg, exported, target.config.dtype),
                       max_new_tokens=eval_max_new_tokens, batch_size=eval_batch)
        if step > 0:
            best.offer(step, r["tau"], dcfg, exported)
        return {"decoder_tau": r["tau"], "decoder_tau_mean": r["tau_mean"], "decode_seconds": r["seconds"]}

    result = train_loop(trainer, params, train_idx, work_dir / "checkpoint", resume=resume, identity=identity,
                        stop_at=stop_at, heldout_seqs=held_idx, evaluate=evaluate if eval_prompts else None,
                        log_path=work_dir / "metrics.jsonl", progress=progress, deadline=deadline)

    # 6. Export: the best evaluated drafter (the last step's when nothing was evaluated).
    chosen = best.load()
    if chosen is None:
        exported_step, exported = result.step, export_params(result.params, inv_scale)
    else:
        exported_step, exported = chosen
    save_drafter(out_dir, dcfg, exported, dtype=SHIP_DTYPE)
    meta = result.meta
    summary = {
        "target": target.name, "out_dir": str(out_dir), "drafter": dcfg.to_hf(), "spec": dataclasses.asdict(spec),
        "train_config": dataclasses.asdict(tcfg), "step": result.step, "exported_step": exported_step, "finished": result.step >= tcfg.steps,
        "prompts": {"train": len(train_idx), "heldout": len(held_idx)},
        "online": online, "devices": trainer.mesh.shape["data"],
        "tokens": {"prompt": int(data.prompt_lens.sum()), "response": data.response_tokens,
                   "train_response": int(sum(len(resp[i]) for i in train_idx))},
        "vocab": vocab, "train_seconds": meta["train_seconds"], "predicted_tokens": meta["predicted_tokens"],
        "train_tokens_per_s": meta["predicted_tokens"] / max(meta["train_seconds"], 1e-9),
        "seconds_this_call": {"responses": gen_seconds, "features": feat_seconds,
                              "total": time.perf_counter() - t_start},
        "timings": timings, "eval_max_new_tokens": eval_max_new_tokens, "max_new_tokens": max_new_tokens,
        "last_log": meta["history"][-1] if meta["history"] else {}, "evals": meta["evals"], "hardware": hardware(),
    }
    text = json.dumps(summary, indent=2)
    (work_dir / "summary.json").write_text(text)
    (out_dir / SUMMARY_FILE).write_text(text)  # beside the drafter: what it is and how it was made
    return summary


SUMMARY_FILE = "training_summary.json"


def _online_scale(target: TargetModel, data: TokenSequences, layer_ids: Sequence[int], path: Path) -> np.ndarray:
    """The features' per-channel RMS for online training, estimated once and kept in ``path``
    (keyed by the data and layers), so a resumed run standardises exactly as before."""
    key = hashlib.sha256(json.dumps([list(layer_ids), data.ids[:64]]).encode() + data.tokens[
        : int(data.offsets[min(64, len(data))])].tobytes()).hexdigest()
    if path.exists():
        rec = json.loads(path.read_text())
        if rec["key"] == key:
            return np.asarray(rec["scale"], np.float32)
    scale = feature_scale(target.params, target.config, data, layer_ids, max_sequences=64)
    path.write_text(json.dumps({"key": key, "scale": scale.tolist()}))
    return scale


class BestDrafter:
    """The evaluated drafter with the highest held-out decoder tau so far, kept in ``folder``
    (fp32) across resumed calls of one run; another run's (other ``run_id``) is ignored."""

    def __init__(self, folder: Path, run_id: str):
        self.folder, self.run_id = Path(folder), run_id
        self.record = self.folder / "best.json"

    def _current(self) -> dict | None:
        if not self.record.exists():
            return None
        rec = json.loads(self.record.read_text())
        return rec if rec.get("run") == self.run_id else None

    def offer(self, step: int, tau: float, dcfg: DrafterConfig, params: Params) -> bool:
        """Keeps ``params`` if their ``tau`` beats the best so far (ties go to the later step)."""
        cur = self._current()
        if cur is not None and tau < cur["decoder_tau"]:
            return False
        self.record.unlink(missing_ok=True)  # never a record that points at half-written weights
        save_drafter(self.folder, dcfg, params, dtype=jnp.float32)
        self.record.write_text(json.dumps({"run": self.run_id, "step": step, "decoder_tau": tau}))
        return True

    def load(self) -> tuple[int, Params] | None:
        cur = self._current()
        if cur is None:
            return None
        return cur["step"], load_drafter(self.folder).params


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="seq", dynamic_ncols=True)


def _tick(bar, done: int, **postfix) -> None:
    if bar is not None:
        bar.n = done
        if postfix:
            bar.set_postfix(**postfix, refresh=False)
        bar.refresh()


def _close(bar) -> None:
    if bar is not None:
        bar.close()
