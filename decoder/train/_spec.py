"""What drafter to train (``DrafterSpec``) and the drafter config it gives for a target.

Every field is a ``setting``: its default, help and bounds live here only, and the
``train-drafter`` command's options are made from them.
"""

from __future__ import annotations

import dataclasses

from dflash_batch.decoder._checkpoint import TargetModel
from dflash_batch.decoder._drafter_config import DrafterConfig, default_target_layer_ids
from dflash_batch.decoder.train._setting import check, setting


@dataclasses.dataclass(frozen=True)
class DrafterSpec:
    """What drafter to train: its shape, and the levers that start it off well."""

    num_layers: int = setting(1, "Draft layers.", option="--layers", low=1)
    block_size: int = setting(16, "Block length: the anchor and the tokens drafted in one pass after it.", low=2)
    target_layer_ids: tuple[int, ...] | None = setting(
        None, "Target layers whose outputs are the context features (comma-separated) "
        "[default: 5 spread by z-lab's rule].", option="--target-layers")
    draft_vocab_size: int | None = setting(8192, "Reduced draft vocabulary size (0: the full target vocabulary).",
                                           option="--draft-vocab", low=1, none_as=0)
    mask_token_id: int | None = setting(None, "Mask id recorded in config.json [default: pad or EOS id; its "
                                        "embedding is replaced by a learned one].", low=0)
    mask_embedding: bool = setting(True, "Learn the mask token's embedding (saved with the drafter); without it, "
                                   "--mask-token-id must name a token the target never emits.")
    init_from_target: bool = setting(True, "Start draft layers from target layers, or from noise.", option="--init",
                                     choices={"target": True, "random": False})
    source_layers: tuple[int, ...] | None = setting(
        None, "Target layers the draft layers start from (comma-separated, one per draft layer) "
        "[default: the ones after the deepest feature layer].")
    standardize: bool = setting(True, "Scale target features per channel (folded into fc at save).")
    intermediate_size: int | None = setting(None, "MLP width of the draft layers [default: the target's, which "
                                            "starting from target layers requires].", low=1)
    # A saved drafter to continue training from: its shape, features and draft vocabulary
    # replace every field above.
    init_drafter: str | None = setting(
        None, "Continue training this drafter (a folder, gs:// prefix, or 'default': the one shipped for the "
        "target), e.g. to fine-tune a published one on your domain: its shape, feature layers and draft "
        "vocabulary replace --layers, --block-size, --target-layers, --draft-vocab and --init.", option="--init-from")

    def __post_init__(self):
        check(self)

    def layer_ids(self, num_target_layers: int) -> tuple[int, ...]:
        if self.target_layer_ids is not None:
            return tuple(int(i) for i in self.target_layer_ids)
        if num_target_layers < 8:
            return tuple(range(num_target_layers))
        return default_target_layer_ids(num_target_layers, max(self.num_layers, 5))


def drafter_config(spec: DrafterSpec, target: TargetModel) -> DrafterConfig:
    """The drafter ``spec`` describes, sized for ``target`` (its hidden sizes, rope and vocabulary)."""
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
