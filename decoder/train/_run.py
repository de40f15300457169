"""``train_drafter``: prompts in, a z-lab format DFlash drafter out.

Stages (each cached in ``work_dir``, so a rerun or ``resume`` skips what is done):
  1. Generate the target's greedy responses to all prompts (``_prepare.respond``), within
     a time budget if one is given.
  2. Hold out ``DataConfig.eval_prompts`` prompts (seeded) for evaluation; train on the rest.
  3. Offline: run the target once over every [prompt ; response] and cache its context
     features and top-k distributions (``_prepare.featurize``). Online: only estimate the
     features' scale; the training step runs the target itself (``_online``).
  4. Choose the draft vocabulary from the training responses (``_prepare.choose_vocab``).
  5. Initialise the drafter from the target (``start_params``), or continue a saved drafter
     (``DrafterSpec.init_drafter``: fine-tuning to a new domain), and train (``_loop``), with
     periodic tau evaluations through the real Decoder (``evaluator``).
  6. Fold the feature standardisation into ``fc`` and save (``export``, bf16) the evaluated
     drafter with the best held-out decoder tau (``_best``).
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
from jax.sharding import Mesh

from dflash_batch.decoder._checkpoint import TargetModel
from dflash_batch.decoder._drafter_checkpoint import Drafter, load_drafter, save_drafter
from dflash_batch.decoder._drafter_config import DrafterConfig
from dflash_batch.decoder._registry import resolve_drafter_dir
from dflash_batch.decoder._target import Params
from dflash_batch.decoder.train._best import BestDrafter
from dflash_batch.decoder.train._config import DataConfig, TrainConfig
from dflash_batch.decoder.train._eval import decode_tau
from dflash_batch.decoder.train._init import export_params, feature_inv_scale, init_params, params_from_drafter
from dflash_batch.decoder.train._loop import LoopResult, Trainer, cast_floats, train_loop
from dflash_batch.decoder.train._prepare import Prepared, prepare
from dflash_batch.decoder.train._spec import DrafterSpec, drafter_config

SHIP_DTYPE = jnp.bfloat16  # what a trained drafter's weights are saved in
SUMMARY_FILE = "training_summary.json"


def train_drafter(target: TargetModel, prompts: Sequence[tuple[str, Sequence[int]]], out_dir: Path, *,
                  work_dir: Path, spec: DrafterSpec = DrafterSpec(), tcfg: TrainConfig = TrainConfig(),
                  data: DataConfig = DataConfig(), resume: bool = False, stop_at: int | None = None,
                  progress: bool = True, log: Callable[[str], None] = print, mesh: Mesh | None = None,
                  gen_deadline: float | None = None, deadline: float | None = None) -> dict:
    """Trains a drafter for ``target`` on its own responses to ``prompts`` (id, token ids)
    and saves it to ``out_dir``. Returns a summary (data, compute, tau) for the model card.

    ``resume`` continues the checkpoint in ``work_dir`` (the same settings are required);
    ``stop_at`` ends this call after that step (the schedule still spans ``tcfg.steps``).
    ``mesh``: the device mesh whose ``data`` axis splits each batch (default: every device).
    Budgets, as ``time.time()``: ``gen_deadline`` ends response generation (training then
    uses the prompts answered, a set recorded in ``work_dir`` so later calls keep it),
    ``deadline`` ends training (checkpointed; the drafter so far is exported).
    """
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    online = jax.default_backend() != "cpu" if data.online is None else data.online
    base, dcfg = drafter_to_train(spec, target)
    prep = prepare(target, prompts, work_dir, dcfg, base, data, seed=tcfg.seed, top_k=tcfg.top_k, online=online,
                   gen_deadline=gen_deadline, progress=progress, log=log)
    inv_scale = feature_inv_scale(prep.scale, spec.standardize)
    params = start_params(dcfg, base, target, spec, prep, inv_scale=inv_scale, seed=tcfg.seed)
    trainer = Trainer(dcfg, target.params, prep.seqs, tcfg, inv_scale=inv_scale, t2d=prep.t2d,
                      target_config=target.config if online else None, mesh=mesh)
    identity = run_identity(target, dcfg, spec, tcfg, prep, online)
    best = BestDrafter(work_dir / "drafter-best", hashlib.sha256(
        json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest())
    evaluate = evaluator(target, dcfg, prep, data, inv_scale, best, work_dir) if data.eval_prompts else None
    result = train_loop(trainer, params, prep.train_idx, work_dir / "checkpoint", resume=resume, identity=identity,
                        stop_at=stop_at, heldout_seqs=prep.held_idx, evaluate=evaluate,
                        log_path=work_dir / "metrics.jsonl", progress=progress, deadline=deadline)
    exported_step = export(out_dir, dcfg, best, result, inv_scale)
    summary = summarize(target, out_dir, dcfg, (spec, tcfg, data), prep, result, exported_step=exported_step,
                        online=online, devices=trainer.mesh.shape["data"], seconds=time.perf_counter() - t_start)
    text = json.dumps(summary, indent=2)
    (work_dir / "summary.json").write_text(text)
    (out_dir / SUMMARY_FILE).write_text(text)  # beside the drafter: what it is and how it was made
    return summary


def drafter_to_train(spec: DrafterSpec, target: TargetModel) -> tuple[Drafter | None, DrafterConfig]:
    """(the saved drafter to continue, or None; the config of the drafter trained)."""
    if not spec.init_drafter:
        return None, drafter_config(spec, target)
    base = load_drafter(resolve_drafter_dir(spec.init_drafter, target.name))
    base.config.check_target(target.config)
    return base, base.config


def start_params(dcfg: DrafterConfig, base: Drafter | None, target: TargetModel, spec: DrafterSpec,
                 prep: Prepared, *, inv_scale, seed: int) -> Params:
    """The drafter's first parameters: the continued drafter's, or new ones copied from the
    target's layers (or drawn from ``seed``), with the feature standardisation applied."""
    if base is not None:
        return params_from_drafter(base.params, inv_scale)
    return init_params(dcfg, target.params, target.config, jax.random.PRNGKey(seed), inv_scale=inv_scale,
                       d2t=prep.d2t, from_target=spec.init_from_target, source_layers=spec.source_layers)


def run_identity(target: TargetModel, dcfg: DrafterConfig, spec: DrafterSpec, tcfg: TrainConfig, prep: Prepared,
                 online: bool) -> dict:
    """What a resumed call must share with the run it continues: the target, the drafter,
    the settings that change the steps (not how often they are logged), and the data."""
    return {"target": str(target.path), "drafter": dcfg.to_hf(), "spec": dataclasses.asdict(spec),
            "train": {k: v for k, v in dataclasses.asdict(tcfg).items()
                      if k not in ("checkpoint_every", "log_every", "eval_every")},
            "data": hashlib.sha256("".join(prep.seqs.ids).encode() + prep.seqs.tokens.tobytes()).hexdigest(),
            "held_out": prep.held_idx, "online": online}


def as_shipped(dcfg: DrafterConfig, params: Params, dtype) -> Drafter:
    """The drafter a job would load from the shipped files: weights rounded to SHIP_DTYPE,
    then run in ``dtype`` (the target's). The tau reported during training is measured on
    it, not on the float32 training copy."""
    return Drafter(dataclasses.replace(dcfg, dtype=dtype), cast_floats(cast_floats(params, SHIP_DTYPE), dtype))


def evaluator(target: TargetModel, dcfg: DrafterConfig, prep: Prepared, data: DataConfig, inv_scale,
              best: BestDrafter, work_dir: Path) -> Callable[[Params, int], dict]:
    """``evaluate(params, step)`` for the loop: the held-out decoder tau of the drafter as
    shipped, which also offers it to ``best``."""
    held_prompts = [(prep.prompts[i][0], prep.prompts[i][1]) for i in prep.held_idx]

    def evaluate(params: Params, step: int) -> dict:
        exported = export_params(params, inv_scale)
        # The latest evaluated drafter, usable while training goes on; ``out_dir`` is written
        # only when the call ends, so a shipped folder never holds an untrained drafter.
        save_drafter(work_dir / "drafter-latest", dcfg, exported)
        r = decode_tau(target, held_prompts, drafter=as_shipped(dcfg, exported, target.config.dtype),
                       max_new_tokens=data.eval_max_new_tokens, batch_size=data.eval_batch)
        if step > 0:
            best.offer(step, r["tau"], dcfg, exported)
        return {"decoder_tau": r["tau"], "decoder_tau_mean": r["tau_mean"], "decode_seconds": r["seconds"]}

    return evaluate


def export(out_dir: Path, dcfg: DrafterConfig, best: BestDrafter, result: LoopResult, inv_scale) -> int:
    """Saves the best evaluated drafter (the last step's when none was evaluated) to
    ``out_dir`` in SHIP_DTYPE; returns its step."""
    chosen = best.load()
    if chosen is None:
        step, params = result.step, export_params(result.params, inv_scale)
    else:
        step, params = chosen
    save_drafter(out_dir, dcfg, params, dtype=SHIP_DTYPE)
    return step


def summarize(target: TargetModel, out_dir: Path, dcfg: DrafterConfig,
              settings: tuple[DrafterSpec, TrainConfig, DataConfig], prep: Prepared, result: LoopResult, *,
              exported_step: int, online: bool, devices: int, seconds: float) -> dict:
    """The run's summary, the model card's source: data, settings, compute and tau by step."""
    spec, tcfg, data = settings
    meta, resp = result.meta, [s.response_ids for s in prep.samples]
    return {
        "target": target.name, "out_dir": str(out_dir), "drafter": dcfg.to_hf(), "spec": dataclasses.asdict(spec),
        "train_config": dataclasses.asdict(tcfg), "data_config": dataclasses.asdict(data), "step": result.step,
        "exported_step": exported_step, "finished": result.step >= tcfg.steps,
        "prompts": {"train": len(prep.train_idx), "heldout": len(prep.held_idx)},
        "online": online, "devices": devices,
        "tokens": {"prompt": int(prep.seqs.prompt_lens.sum()), "response": prep.seqs.response_tokens,
                   "train_response": int(sum(len(resp[i]) for i in prep.train_idx))},
        "vocab": prep.vocab, "train_seconds": meta["train_seconds"], "predicted_tokens": meta["predicted_tokens"],
        "train_tokens_per_s": meta["predicted_tokens"] / max(meta["train_seconds"], 1e-9),
        "seconds_this_call": dict(prep.seconds, total=seconds),
        "timings": prep.timings, "eval_max_new_tokens": data.eval_max_new_tokens,
        "max_new_tokens": data.max_new_tokens,
        "last_log": meta["history"][-1] if meta["history"] else {}, "evals": meta["evals"], "hardware": hardware(),
    }


def hardware() -> str:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    return f"{dev.platform}:{kind}, {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"
