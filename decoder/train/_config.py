"""How a drafter is trained (``TrainConfig``) and on what data (``DataConfig``).

Every field is a ``setting``: its default, help and bounds live here only, and the
``train-drafter`` command's options are made from them.
"""

from __future__ import annotations

import dataclasses

from dflash_batch.decoder.train._setting import check, setting


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Defaults follow the DFlash paper where it says (AdamW,
    lr 6e-4, cosine, 4% warmup, clip 1.0); the rest were chosen on this project's CPU."""

    steps: int = setting(2000, "Optimiser steps of the whole run (the schedule's length).", low=1)
    batch_size: int = setting(4, "Sequences per step.", option="--batch", low=1)
    anchors: int = setting(16, "Blocks per sequence (A).", low=1)
    lr: float = setting(6e-4, "Peak learning rate.", above=0)
    warmup: float = setting(0.04, "Warmup, a fraction of --steps.", low=0, below=1)
    weight_decay: float = setting(0.01, "AdamW weight decay (matrices only).", low=0)
    b2: float = setting(0.95, "AdamW's second-moment decay.", low=0, below=1)
    clip: float = setting(1.0, "Gradient clipping by global norm.", above=0)
    gamma: float | None = setting(None, "Loss decay over block positions [default: the paper's for the block size].",
                                  above=0)
    distill: float = setting(0.5, "Weight of the loss to the target's distribution (the rest on its tokens).",
                             low=0, high=1)
    top_k: int = setting(32, "Target distribution entries kept for distillation.", low=1)
    teacher: str = setting("topk", "Distillation target: the target's top-k entries, or its full distribution "
                           "over the draft vocabulary (KL; computed in each step from the target's output-head "
                           "input).", choices=("topk", "full"))
    seed: int = setting(0, "Seed of the held-out choice, the initialisation, the batches and the anchors.")
    checkpoint_every: int = setting(100, "Steps between checkpoints.", low=1)
    log_every: int = setting(10, "Steps averaged into one metrics.jsonl record.", low=1)
    # Evaluations are what the exported drafter is chosen by (the best held-out tau), so a run
    # evaluates along the way unless told otherwise.
    eval_every: int = setting(500, "Steps between tau evaluations with the real decoder (0: at the end only).",
                              low=0)

    def __post_init__(self):
        check(self)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The training data (the target's greedy responses, and its features) and the held-out
    prompts that the real decoder measures tau on during training."""

    max_new_tokens: int = setting(128, "Response length.", low=1)
    gen_batch: int = setting(8, "Decoder batch for responses.", low=1)
    gen_mode: str = setting("ar", "Decode mode for responses (both lossless: same tokens).", choices=("ar", "ngram"))
    eval_prompts: int = setting(16, "Held-out prompts.", low=0)
    eval_max_new_tokens: int = setting(64, "Tokens decoded per held-out prompt in an evaluation.", low=1)
    eval_batch: int = setting(8, "Decoder batch of an evaluation.", low=1)
    online: bool | None = setting(None, "Run the target inside the training step (no feature cache on disk) "
                                  "[default: online on an accelerator, offline on the CPU].", option="--online/--offline")

    def __post_init__(self):
        check(self)
