"""The training loop: AdamW + warmup-cosine + clipping over packed blocks, checkpointed and resumable.

Determinism is what makes resuming exact. Step s trains on
  * sequences: positions s*B .. s*B+B-1 of an endless stream of epochs, epoch e being a
    permutation drawn from (seed, e);
  * anchors: drawn from (seed, s);
so a run restarted from the checkpoint of step s computes bit-for-bit the same steps
s, s+1, ... as a run that never stopped. The checkpoint holds parameters, optimiser
state, the step and the seed (see ``_state``); SIGTERM and Ctrl-C write one before leaving.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dflash_batch.decoder._config import TargetConfig
from dflash_batch.decoder._drafter_config import DrafterConfig
from dflash_batch.decoder._mesh import make_mesh
from dflash_batch.decoder._target import Params, head_rows
from dflash_batch.decoder.train._blocks import make_batch, make_token_batch
from dflash_batch.decoder.train._config import TrainConfig
from dflash_batch.decoder.train._features import FeatureCache
from dflash_batch.decoder.train._online import TokenSequences, target_outputs
from dflash_batch.decoder.train._loss import block_loss, loss_weights
from dflash_batch.decoder.train._packed import packed_draft_logits
from dflash_batch.decoder.train._state import has_checkpoint, load_checkpoint, save_checkpoint

SEQ_STEP = 128  # granularity of a batch's padded context length S


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW on a warmup-cosine schedule (decay only on matrices)."""
    warm = max(1, round(tcfg.warmup * tcfg.steps))
    sched = optax.warmup_cosine_decay_schedule(0.0, tcfg.lr, warm, max(tcfg.steps, warm + 1), end_value=0.0)
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731 (not norms, not d2t)
    return optax.chain(optax.clip_by_global_norm(tcfg.clip),
                       optax.adamw(sched, b1=0.9, b2=tcfg.b2, weight_decay=tcfg.weight_decay, mask=decay_mask))


def batch_sequences(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """The sequence indices [B] of ``step``: a slice of an endless stream of seeded epochs."""
    pos = step * batch_size + np.arange(batch_size)
    out = np.empty(batch_size, np.int64)
    for e in np.unique(pos // n):
        perm = np.random.default_rng([seed, int(e)]).permutation(n)
        sel = pos // n == e
        out[sel] = perm[pos[sel] % n]
    return out


def anchor_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1, step])


def cast_floats(params: Params, dtype) -> Params:
    """The floating-point leaves in ``dtype`` (integer tables such as ``d2t`` untouched)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)


def _frozen(params: Params) -> Params:
    """``d2t`` is integer data, not a parameter: keep it out of gradients and updates."""
    return {k: v for k, v in params.items() if k != "d2t"}


def draft_vocab_logits(target_params: Params, d2t: jax.Array | None, head_in: jax.Array) -> jax.Array:
    """The target's logits [..., V'] over the draft vocabulary (target ids ``d2t`` [V'], or
    all of them) from its output head's input [..., D]: only the V' rows of the head run."""
    return jnp.einsum("...D,VD->...V", head_in, head_rows(target_params, d2t), preferred_element_type=jnp.float32)


def _default_mesh() -> Mesh:
    """Every local device on the ``data`` axis (the drafter is small: no model parallelism)."""
    return make_mesh(jax.local_device_count(), 1)


class Trainer:
    """Jitted step and evaluation of one drafter, data-parallel over a device mesh.

    Offline (``data`` a ``FeatureCache``): batches carry the cached target features.
    Online (``data`` a ``TokenSequences``, ``target_config`` given): batches carry tokens
    and the step runs the frozen target itself (``_online``). Both share the block sampler
    (``_blocks``) and the loss (``_loss``).

    Data parallelism: every batch array is split over the mesh's ``data`` axis (its first
    dimension, B), parameters and optimiser state are replicated, and the step is one jit
    with those shardings: the loss is a mean over the global batch, so the compiler's
    gradient is the global one, averaged across devices with no collective written here.
    """

    def __init__(self, dcfg: DrafterConfig, target_params: Params, data: FeatureCache | TokenSequences,
                 tcfg: TrainConfig, *, inv_scale: np.ndarray, t2d: np.ndarray | None,
                 target_config: TargetConfig | None = None, mesh: Mesh | None = None):
        self.dcfg, self.data, self.tcfg = dcfg, data, tcfg
        self.online = isinstance(data, TokenSequences)
        if self.online and target_config is None:
            raise ValueError("online training runs the target: pass its target_config")
        self.target_config = target_config
        self.mesh = mesh if mesh is not None else _default_mesh()
        n_data = self.mesh.shape["data"]
        if tcfg.batch_size % n_data:
            raise ValueError(f"{tcfg.batch_size=} must be a multiple of the mesh's {n_data} data shards")
        self._replicated = NamedSharding(self.mesh, P())
        self._split = NamedSharding(self.mesh, P("data"))
        kept = target_params if self.online else {"embed": target_params["embed"], **(
            {"lm_head": target_params["lm_head"]} if "lm_head" in target_params else {})}
        self.target_params = self.place(kept)
        # Mixed precision: the forward and backward run in the target's dtype (bf16 on an
        # accelerator), on copies of the float32 master weights; the gradients, the optimiser
        # state and the updates stay float32, so small updates are not rounded away.
        self.compute_dtype = jnp.dtype(target_params["embed"].dtype)
        self.inv_scale = self.place(jnp.asarray(inv_scale))
        self.t2d = t2d
        self._t2d = self.place(jnp.asarray(t2d)) if t2d is not None else None
        self.weights = self.place(jnp.asarray(loss_weights(dcfg.block_size, tcfg.gamma)))
        self.opt = make_optimizer(tcfg)
        rep, split = self._replicated, self._split
        self._step = jax.jit(self._train_step, donate_argnums=(0, 1), in_shardings=(rep, rep, rep, split),
                             out_shardings=(rep, rep, rep))
        self._eval = jax.jit(self._metrics, in_shardings=(rep, rep, split), out_shardings=rep)

    def place(self, tree):
        """``tree`` replicated over the mesh (parameters, optimiser state, constants)."""
        return jax.device_put(tree, self._replicated)

    def _inputs(self, target_params, d2t, batch) -> dict:
        """The batch with the target's outputs: read from it (offline) or computed (online),
        and with ``teacher="full"`` the target's logits over the draft vocabulary."""
        full = self.tcfg.teacher == "full"
        if self.online:
            batch = dict(batch, **target_outputs(target_params, self.target_config, batch,
                                                 layer_ids=tuple(self.dcfg.target_layer_ids),
                                                 top_k=0 if full else self.tcfg.top_k, t2d=self._t2d))
        if full:
            batch = dict(batch, teacher_logits=draft_vocab_logits(target_params, d2t, batch["head_in"]))
        return batch

    def _loss(self, trainable, d2t, target_params, batch):
        params = dict(cast_floats(trainable, self.compute_dtype), **({"d2t": d2t} if d2t is not None else {}))
        batch = self._inputs(target_params, d2t, batch)
        logits = packed_draft_logits(params, self.dcfg, target_params, batch["feats"], self.inv_scale,
                                     batch["block_tokens"], batch["anchor_pos"])
        return block_loss(logits, batch, self.weights, self.tcfg.distill)

    def _train_step(self, params, opt_state, target_params, batch):
        trainable, d2t = _frozen(params), params.get("d2t")
        (_, metrics), grads = jax.value_and_grad(self._loss, has_aux=True)(trainable, d2t, target_params, batch)
        updates, opt_state = self.opt.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return dict(trainable, **({"d2t": d2t} if d2t is not None else {})), opt_state, metrics

    def _metrics(self, params, target_params, batch):
        return self._loss(_frozen(params), params.get("d2t"), target_params, batch)[1]

    def init_opt(self, params: Params):
        return self.place(self.opt.init(_frozen(params)))

    def loss(self, params: Params, batch: dict) -> tuple[jax.Array, dict]:
        """(loss, metrics) of ``params`` on ``batch``, unjitted (for tests and inspection)."""
        return self._loss(_frozen(params), params.get("d2t"), self.target_params, batch)

    def batch(self, seqs: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """A packed batch whose context length is its longest sequence rounded up to
        SEQ_STEP: a handful of compiled shapes, and a batch of short prompts does not pay
        for the longest prompt in the data set. Online, every batch takes the data set's
        longest sequence instead (cap prompt lengths to keep it short)."""
        if self.online:  # one length for every batch: the step holds the whole target, compile it once
            longest = int(self.data.seq_lens.max())
        else:
            longest = int(self.data.seq_lens[np.asarray(seqs)].max())
        kw = dict(n_anchors=self.tcfg.anchors, block_size=self.dcfg.block_size, seq_len=-(-longest // SEQ_STEP) * SEQ_STEP,
                  mask_token_id=self.dcfg.mask_token_id, t2d=self.t2d)
        if self.online:
            return make_token_batch(self.data, seqs, rng, **kw)
        return make_batch(self.data, seqs, rng, head_in=self.tcfg.teacher == "full", **kw)

    def step(self, params, opt_state, batch):
        return self._step(params, opt_state, self.target_params, batch)

    def evaluate(self, params: Params, seqs: Sequence[int], seed: int = 12345) -> dict[str, float]:
        """Metrics of ``_loss.block_loss`` on ``seqs`` (fixed anchors), averaged over batches."""
        rng = np.random.default_rng(seed)
        b = self.tcfg.batch_size
        seqs = np.asarray(seqs)
        out: list[dict] = []
        for i in range(0, len(seqs), b):
            chunk = seqs[i : i + b]
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - len(chunk))])  # fixed shape; repeats count twice
            out.append(jax.device_get(self._eval(params, self.target_params, self.batch(chunk, rng))))
        return {k: float(np.mean([o[k] for o in out])) for k in out[0]} if out else {}


@dataclasses.dataclass
class LoopResult:
    params: Params
    step: int
    losses: list[float]  # the loss of every step this call ran, in order
    meta: dict


class _Stop:
    """Turns SIGTERM into a flag the loop checks, so a killed run still checkpoints."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._old = None
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def train_loop(trainer: Trainer, params: Params, train_seqs: Sequence[int], ckpt_dir: Path, *, resume: bool,
               identity: dict, stop_at: int | None = None, heldout_seqs: Sequence[int] = (),
               evaluate: Callable[[Params, int], dict] | None = None, log_path: Path | None = None,
               progress: bool = True, deadline: float | None = None) -> LoopResult:
    """Runs steps until ``trainer.tcfg.steps`` (or ``stop_at``), checkpointing every
    ``checkpoint_every`` steps, on exit, and on SIGTERM / Ctrl-C.

    ``identity``: what must match to resume (the configuration and data); a mismatch
    refuses to resume. ``evaluate(params, step)`` (optional) runs every ``eval_every``
    steps and at the end, on top of the cheap held-out metrics of ``heldout_seqs``.
    Without ``resume`` an existing checkpoint is an error, so no run is overwritten by accident.
    ``deadline`` (a ``time.time()``): stop like SIGTERM once it has passed, checkpointed,
    so a run with a wall-clock budget resumes where the budget ended it.

    1. Start fresh, or from the checkpoint in ``ckpt_dir`` (``_start``).
    2. Evaluate the untrained drafter: the baseline every later evaluation is read against.
    3. Train step by step (``_steps``) until the end, ``stop_at``, a signal or the deadline.
    4. Evaluate the final drafter once the schedule is complete, and checkpoint.
    """
    tcfg = trainer.tcfg
    params, opt_state, meta = _start(trainer, params, ckpt_dir, resume=resume, identity=identity)
    end = min(tcfg.steps, stop_at) if stop_at is not None else tcfg.steps
    run = _Run(trainer, params, opt_state, meta, ckpt_dir=ckpt_dir, log_path=log_path, heldout_seqs=heldout_seqs,
               evaluate=evaluate, bar=_step_bar(progress, tcfg.steps, meta["step"]))
    if run.step == 0 and tcfg.eval_every and end > 0:
        run.evaluate()
    try:
        with _Stop() as stop:
            _steps(run, np.asarray(train_seqs), end, stop, deadline)
            if stop.requested:
                print(f"stopped (signal or time budget) at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"checkpointing step {run.step} and stopping", file=sys.stderr, flush=True)
            if run.step >= tcfg.steps and not any(e["step"] == run.step for e in meta["evals"]):
                run.evaluate()
    except KeyboardInterrupt:
        try:
            run.checkpoint()
        except RuntimeError:  # interrupted inside a step: its donated inputs are gone
            pass  # the last periodic checkpoint stands
        raise
    finally:
        if run.bar is not None:
            run.bar.close()
    run.checkpoint()
    return LoopResult(params=run.params, step=run.step, losses=run.losses, meta=meta)


def _start(trainer: Trainer, params: Params, ckpt_dir: Path, *, resume: bool, identity: dict) -> tuple:
    """(params, optimiser state, meta) placed on the mesh: fresh, or the checkpoint's when
    ``resume`` asks for it and its ``identity`` is this run's."""
    params = trainer.place(params)
    opt_state = trainer.init_opt(params)
    meta = {"step": 0, "seed": trainer.tcfg.seed, "identity": identity, "train_seconds": 0.0, "predicted_tokens": 0,
            "history": [], "evals": []}
    if not has_checkpoint(ckpt_dir):
        return params, opt_state, meta
    if not resume:
        raise FileExistsError(f"{ckpt_dir} holds a checkpoint: resume it, or choose another work dir")
    (params, opt_state), meta = load_checkpoint(ckpt_dir, (params, opt_state))
    params, opt_state = trainer.place((params, opt_state))
    if meta["identity"] != json.loads(json.dumps(identity)):  # compared as the checkpoint stored it (JSON)
        diff = sorted(k for k in set(identity) | set(meta["identity"])
                      if json.loads(json.dumps(identity.get(k))) != meta["identity"].get(k))
        raise ValueError(f"cannot resume {ckpt_dir}: the run's settings differ in {diff}")
    return params, opt_state, meta


def _step_bar(progress: bool, total: int, initial: int):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="train-drafter", dynamic_ncols=True)


def _steps(run: "_Run", train_seqs: np.ndarray, end: int, stop: _Stop, deadline: float | None) -> None:
    """Trains until step ``end`` or a stop request (a signal, or ``deadline`` passing),
    evaluating every ``eval_every`` and checkpointing every ``checkpoint_every`` steps.

    Step s trains on the s-th slice of the seeded sequence stream with anchors drawn from
    (seed, s), so what a step computes depends on s alone, not on where a call started.
    """
    tcfg = run.trainer.tcfg
    while run.step < end and not stop.requested:
        if deadline is not None and time.time() >= deadline:
            stop.requested = True
            break
        seqs = train_seqs[batch_sequences(tcfg.seed, run.step, len(train_seqs), tcfg.batch_size)]
        run.train_step(run.trainer.batch(seqs, anchor_rng(tcfg.seed, run.step)), end)
        if tcfg.eval_every and run.step % tcfg.eval_every == 0 and run.step < tcfg.steps:
            run.evaluate()  # the final step's evaluation waits until the loop has ended
        if run.step % tcfg.checkpoint_every == 0:
            run.checkpoint()


class _Run:
    """One call of ``train_loop``: the state carried from step to step (parameters,
    optimiser state, ``meta``: the checkpointed counters and records) and what it writes."""

    def __init__(self, trainer: Trainer, params: Params, opt_state, meta: dict, *, ckpt_dir: Path,
                 log_path: Path | None, heldout_seqs: Sequence[int],
                 evaluate: Callable[[Params, int], dict] | None, bar):
        self.trainer, self.params, self.opt_state, self.meta = trainer, params, opt_state, meta
        self.ckpt_dir, self.log_path, self.bar = ckpt_dir, log_path, bar
        self.heldout_seqs, self._evaluate = heldout_seqs, evaluate
        self.step = meta["step"]
        self.losses: list[float] = []  # the loss of every step of this call
        # The current log window: per-step metrics, and step time only (no evaluations) and tokens.
        self._window: list[dict] = []
        self._seconds, self._tokens = 0.0, 0

    def checkpoint(self) -> None:
        self.meta["step"] = self.step
        save_checkpoint(self.ckpt_dir, (self.params, self.opt_state), self.meta)

    def log(self, record: dict) -> None:
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def train_step(self, batch: dict, end: int) -> None:
        """One optimiser step on ``batch``, timed; its metrics join the log window."""
        batch_tokens = int(batch["label_exists"].sum())
        t0 = time.perf_counter()
        self.params, self.opt_state, metrics = self.trainer.step(self.params, self.opt_state, batch)
        metrics = jax.device_get(metrics)  # waits for the step: the time below is the step's
        dt = time.perf_counter() - t0
        self.meta["train_seconds"] += dt
        self.meta["predicted_tokens"] += batch_tokens
        self._seconds += dt
        self._tokens += batch_tokens
        self.losses.append(float(metrics["loss"]))
        self.step += 1
        self._window.append({k: float(v) for k, v in metrics.items()})
        if self.step % self.trainer.tcfg.log_every == 0 or self.step == end:
            avg = {k: float(np.mean([w[k] for w in self._window])) for k in self._window[0]}
            avg.update(step=self.step, tok_s=self._tokens / max(self._seconds, 1e-9))
            self.meta["history"].append(avg)
            self.log(avg)
            self._window, self._seconds, self._tokens = [], 0.0, 0
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc1=f"{metrics['acc1']:.3f}",
                                 tau=f"{metrics['tau']:.2f}", tau_h=f"{metrics['tau_h']:.2f}")

    def evaluate(self) -> None:
        """Records the held-out metrics and ``evaluate``'s (decoder tau) at the current step."""
        rec: dict = {"step": self.step, "predicted_tokens": self.meta["predicted_tokens"],
                     "train_seconds": self.meta["train_seconds"]}
        if len(self.heldout_seqs):
            rec.update({f"heldout_{k}": v for k, v in self.trainer.evaluate(self.params, self.heldout_seqs).items()})
        if self._evaluate is not None:
            rec.update(self._evaluate(self.params, self.step))
        self.meta["evals"].append(rec)
        self.log({"eval": rec})
        if self.bar is not None:
            self.bar.write("eval " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in rec.items() if not isinstance(v, (list, dict))))
