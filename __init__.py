"""dflash-batch: offline batch LLM generation with DFlash speculative decoding.

The package's subfolders are the repository's top-level folders:

- ``dflash_batch.schemas``  Arrow/Parquet contracts and row validation
- ``dflash_batch.decoder``  JAX target models, drafters, AR and speculative decoding
- ``dflash_batch.kernels``  attention kernels and their plain-jnp references
- ``dflash_batch.pipeline`` the Beam pipeline
- ``dflash_batch.jobs``     job specs and the ``dflash-batch`` command line
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def _leave_the_path_to_installed_packages() -> None:
    """Takes this package's own folder off ``sys.path``.

    The folder is the repository root in a checkout, and ``python -m`` / ``python -c`` from there
    put it first on the path (as ``''``): its subfolders would then shadow installed packages of
    the same names (transformers imports one called ``kernels``). They are only ever meant to be
    imported as ``dflash_batch.<name>``, so the folder has no business on the path.
    """
    here = _os.path.realpath(_os.path.dirname(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != here]


_leave_the_path_to_installed_packages()
