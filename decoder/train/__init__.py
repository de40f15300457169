"""DFlash drafter training: the target's own responses, the target's features (cached on disk,
or computed in the step when training online), packed block-diffusion training, data-parallel
over a device mesh, and tau measured with the real decoder.

Extra axis beside the decoder's alphabet: A anchors (blocks) per training sequence.
"""

from dflash_batch.decoder.train._blocks import (
    draft_soft_labels, make_batch, make_token_batch, sample_anchors, sample_blocks,
)
from dflash_batch.decoder.train._data import Sample, generate_responses, read_samples
from dflash_batch.decoder.train._eval import decode_tau
from dflash_batch.decoder.train._features import FeatureCache, build_feature_cache, open_feature_cache
from dflash_batch.decoder.train._init import export_params, feature_inv_scale, init_params
from dflash_batch.decoder.train._config import DataConfig, TrainConfig
from dflash_batch.decoder.train._loop import Trainer, train_loop
from dflash_batch.decoder.train._loss import block_loss, default_gamma, loss_weights
from dflash_batch.decoder.train._online import TokenSequences, feature_scale, target_outputs
from dflash_batch.decoder.train._packed import attention_mask, context_mask, packed_draft_logits
from dflash_batch.decoder.train._prepare import split_prompts
from dflash_batch.decoder.train._run import SUMMARY_FILE, train_drafter
from dflash_batch.decoder.train._setting import SettingsError
from dflash_batch.decoder.train._spec import DrafterSpec, drafter_config
from dflash_batch.decoder.train._vocab import coverage, select_draft_vocab, target_to_draft, token_counts

__all__ = [
    "SUMMARY_FILE", "SettingsError",
    "DataConfig", "DrafterSpec", "FeatureCache", "Sample", "TokenSequences", "TrainConfig", "Trainer", "attention_mask",
    "block_loss", "build_feature_cache", "context_mask", "coverage", "decode_tau", "default_gamma",
    "draft_soft_labels", "drafter_config", "export_params", "feature_inv_scale", "feature_scale",
    "generate_responses", "init_params", "loss_weights", "make_batch", "make_token_batch", "open_feature_cache",
    "packed_draft_logits", "read_samples", "sample_anchors", "sample_blocks", "select_draft_vocab", "split_prompts",
    "target_outputs", "target_to_draft", "token_counts", "train_drafter", "train_loop",
]
