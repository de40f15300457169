"""DFlash drafter training: the target's own responses, cached target features, packed
block-diffusion training, and tau measured with the real decoder.

Extra axis beside the decoder's alphabet: A anchors (blocks) per training sequence.
"""

from dflash_batch.decoder.train._blocks import make_batch, sample_anchors
from dflash_batch.decoder.train._data import Sample, generate_responses, read_samples
from dflash_batch.decoder.train._eval import decode_tau
from dflash_batch.decoder.train._features import FeatureCache, build_feature_cache, open_feature_cache
from dflash_batch.decoder.train._init import export_params, feature_inv_scale, init_params
from dflash_batch.decoder.train._loop import TrainConfig, Trainer, train_loop
from dflash_batch.decoder.train._loss import block_loss, default_gamma, loss_weights
from dflash_batch.decoder.train._packed import attention_mask, context_mask, packed_draft_logits
from dflash_batch.decoder.train._run import DrafterSpec, drafter_config, split_prompts, train_drafter
from dflash_batch.decoder.train._vocab import coverage, select_draft_vocab, target_to_draft, token_counts

__all__ = [
    "DrafterSpec", "FeatureCache", "Sample", "TrainConfig", "Trainer", "attention_mask", "block_loss",
    "build_feature_cache", "context_mask", "coverage", "decode_tau", "default_gamma", "drafter_config",
    "export_params", "feature_inv_scale", "generate_responses", "init_params", "loss_weights", "make_batch",
    "open_feature_cache", "packed_draft_logits", "read_samples", "sample_anchors", "select_draft_vocab",
    "split_prompts", "target_to_draft", "token_counts", "train_drafter", "train_loop",
]
