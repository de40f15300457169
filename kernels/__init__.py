"""Attention kernels for DFlash: Pallas (TPU) with plain-jnp references, and the dispatch
that picks between them (see _dispatch)."""

from dflash_batch.kernels._dispatch import (ENV_VAR, IMPLS, attention_impl, default_impl,
                                            use_attention_impl)
from dflash_batch.kernels._selfcheck import (KernelFallbackWarning, SelfCheck, attention_report,
                                             forget_self_checks, self_check)
from dflash_batch.kernels._draft_attention import (DraftBlockSizes, draft_attention,
                                                   reference_draft_attention)
from dflash_batch.kernels._verify_attention import (VerifyBlockSizes, reference_verify_attention,
                                                    verify_attention)

__all__ = [
    "ENV_VAR", "IMPLS", "attention_impl", "default_impl", "use_attention_impl",
    "KernelFallbackWarning", "SelfCheck", "attention_report", "forget_self_checks", "self_check",
    "VerifyBlockSizes", "verify_attention", "reference_verify_attention",
    "DraftBlockSizes", "draft_attention", "reference_draft_attention",
]
