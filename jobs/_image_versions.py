"""The worker image's Python and Beam versions, and the check that the submitter matches them.

Dataflow runs the pipeline that this machine pickled inside the worker image's Python and Beam;
Google's custom-container guide requires both to match the submitting environment (a different
Python minor version or Beam release fails on the workers, after the TPUs are paid for).

The image's versions are the build arguments of ``container/Dockerfile`` (``PYTHON_VERSION``,
``BEAM_VERSION``), which the image also records: in its labels (``dflash_batch.python``,
``dflash_batch.beam``) and in ``/opt/dflash_batch/image.json``. Where the image was built on this
machine, ``docker image inspect`` reads its labels (offline); otherwise the recipe that this
package ships says what an image built from it holds.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

DOCKERFILE = Path(__file__).parent / "container" / "Dockerfile"
LABELS = {"python": "dflash_batch.python", "beam": "dflash_batch.beam"}


def recipe_versions(dockerfile: Path = DOCKERFILE) -> dict[str, str]:
    """The Dockerfile's ``ARG NAME=VALUE`` defaults: {"python": ..., "beam": ..., "jax": ...}."""
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", dockerfile.read_text(encoding="utf-8"), re.M))
    return {"python": args["PYTHON_VERSION"], "beam": args["BEAM_VERSION"], "jax": args["JAX_VERSION"]}


def local_image_labels(image: str) -> dict[str, str] | None:
    """The image's version labels when a Docker engine here has it, else None (no pull: offline)."""
    if shutil.which("docker") is None:
        return None
    try:
        out = subprocess.run(["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", image],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    labels = json.loads(out.stdout or "null") or {}
    found = {k: labels[label] for k, label in LABELS.items() if label in labels}
    return found if len(found) == len(LABELS) else None


def image_versions(image: str) -> tuple[dict[str, str], str]:
    """(the image's {"python", "beam"} versions, where they were read)."""
    labels = local_image_labels(image)
    if labels is not None:
        return labels, f"the labels of {image} (local Docker)"
    return recipe_versions(), f"the recipe {DOCKERFILE.name} this package ships"


def version_problems(image: str) -> list[str]:
    """Problems naming runner.sdk_container_image when this Python or Beam differs from the image's."""
    import apache_beam

    want, source = image_versions(image)
    have = {"python": f"{sys.version_info.major}.{sys.version_info.minor}", "beam": apache_beam.__version__}
    return [f"runner.sdk_container_image: the image runs {name.capitalize()} {want[name]} (from {source}), but this "
            f"machine submits with {name.capitalize()} {have[name]}; Dataflow needs them equal: submit from a "
            f"Python {want['python']} environment with apache-beam=={want['beam']}, or rebuild the image with "
            f"--build-arg {name.upper()}_VERSION={have[name]}"
            for name in ("python", "beam") if want[name] != have[name]]
