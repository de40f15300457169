"""Attention kernels for DFlash: Pallas (TPU) with plain-jnp references, and the dispatch
that picks between them (see _dispatch)."""

if __name__ != "dflash_batch.kernels":
    # The repository root was on sys.path (python -m / -c run from it), so this folder was found
    # as the top-level `kernels`, the name of an installed package that transformers imports.
    raise ImportError(
        f"{__file__} was imported as {__name__!r}: the repository root on sys.path shadows the installed "
        "'kernels' package. Import dflash_batch first (it takes the root off the path), run python with -P, "
        "or run it from another folder; pytest from the root needs nothing.")

from dflash_batch.kernels._dispatch import (ENV_VAR, IMPLS, attention_impl, default_impl,
                                            use_attention_impl)
from dflash_batch.kernels._selfcheck import (KernelFallbackWarning, SelfCheck, attention_report,
                                             self_check)
from dflash_batch.kernels._draft_attention import (DraftBlockSizes, draft_attention,
                                                   reference_draft_attention)
from dflash_batch.kernels._verify_attention import (VerifyBlockSizes, reference_verify_attention,
                                                    verify_attention)

__all__ = [
    "ENV_VAR", "IMPLS", "attention_impl", "default_impl", "use_attention_impl",
    "KernelFallbackWarning", "SelfCheck", "attention_report", "self_check",
    "VerifyBlockSizes", "verify_attention", "reference_verify_attention",
    "DraftBlockSizes", "draft_attention", "reference_draft_attention",
]
