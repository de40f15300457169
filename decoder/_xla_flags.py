"""XLA settings the decoder's exactness rests on, set before JAX starts its backend.

``--xla_allow_excess_precision=false``: by default XLA may skip a bfloat16 rounding that the
program asks for (it keeps a float32 intermediate inside a fusion), and whether it does depends
on how ops fuse, which depends on shapes. A 1-token AR step and an L-token verify pass then
round the same value differently, and 30 layers grow one bf16 step into another token. With
the flag off, every rounding happens where the code writes it, at every shape; float32
programs are unaffected.
"""

from __future__ import annotations

import os

EXACT_ROUNDING = "--xla_allow_excess_precision=false"


def require_exact_rounding() -> None:
    """Adds the flag to ``XLA_FLAGS`` unless the environment already sets it (either way).

    XLA reads its flags when JAX first uses a device, so this runs when the decoder package
    is imported (below); a process that ran JAX computations before that keeps its own setting.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_allow_excess_precision" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {EXACT_ROUNDING}".strip()


require_exact_rounding()
