"""The worker's TPU variables, set by the decode step from the job's own machine type.

The container's entrypoint sets them from ``DFLASH_TPU_MACHINE_TYPE`` or the metadata server;
this is the second source, so a worker whose metadata server did not answer still starts libtpu
with the slice's topology. libtpu reads the variables once, when JAX starts its backend, so this
runs in ``Decode.setup``, before the first batch loads the model. The pipeline never imports
``jobs``: the job spec (pickled with the DoFn) computes the variables (``runner.worker_env()``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

_LOG = logging.getLogger(__name__)


def _backend_started() -> bool:
    import sys

    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # private, but the only way to ask without starting it

    return bool(getattr(xla_bridge, "_backends", None))


def apply_worker_env(spec: Any, environ: Any = None) -> dict[str, str]:
    """Sets the TPU variables of ``spec``'s workers that ``environ`` lacks; returns those it set.

    A value already there (the entrypoint's) is kept; one that differs from the job's is logged,
    as is a JAX backend that started before this ran (then libtpu has read the old values).
    """
    environ = os.environ if environ is None else environ
    runner = getattr(spec, "runner", None)
    wanted = runner.worker_env() if hasattr(runner, "worker_env") else {}
    set_now = {}
    for key, value in wanted.items():
        if key not in environ:
            environ[key] = set_now[key] = value
        elif environ[key] != value:
            _LOG.warning("%s=%s in the worker's environment, but the job's machine type %s gives %s; keeping %s",
                         key, environ[key], runner.machine_type, value, environ[key])
    if set_now and _backend_started():
        _LOG.warning("the JAX backend started before the TPU variables %s were set; libtpu did not see them",
                     sorted(set_now))
    return set_now
