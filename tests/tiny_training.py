"""Settings of the tiny end-to-end drafter training that the trainer tests share."""

from __future__ import annotations

import numpy as np

from dflash_batch.decoder.train import DrafterSpec, TrainConfig

VOCAB = 32  # a small vocabulary makes the tiny random target's greedy text learnable from little data
SPEC = DrafterSpec(num_layers=1, block_size=8, target_layer_ids=(0, 1, 2), draft_vocab_size=24)
TRAIN = TrainConfig(steps=200, batch_size=4, anchors=8, lr=3e-3, eval_every=200, checkpoint_every=100, log_every=20)
N_PROMPTS, N_HELD_OUT = 160, 16


def tiny_prompts(n: int = N_PROMPTS, seed: int = 0) -> list[tuple[str, list[int]]]:
    """Random prompts of 4-15 tokens (ids 3.., clear of pad, BOS and EOS)."""
    rng = np.random.default_rng(seed)
    return [(f"p{i}", rng.integers(3, VOCAB, size=int(rng.integers(4, 16))).tolist()) for i in range(n)]
