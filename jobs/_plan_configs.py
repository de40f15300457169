"""Where ``submit`` finds the config.json files it plans a job's memory with, without the network.

``submit`` never reads a gs:// model: a dry run must work offline and without credentials, and
a real submit must not depend on this machine's access to the bucket (the workers read it). The
target's config comes from, in order:

1. ``[model] config`` / ``submit --model-config``: a local config.json (or a folder holding one),
   or the name of a known model (``_model_shapes``);
2. the known shapes, for a registered model name or a gs:// folder named like a known model.

The drafter's (modes dflash and hybrid) from ``[model] drafter_config`` / ``--drafter-config``,
the drafter shipped in this package (``default``), or the known published drafters. When none
applies, ``PlanUnavailable`` says which setting to give.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from dflash_batch.jobs import _model_shapes as shapes


class PlanUnavailable(ValueError):
    """The memory plan cannot be made here; the message names the setting that would allow it."""


@dataclasses.dataclass(frozen=True)
class PlanConfigs:
    target: dict[str, Any]
    target_source: str  # where the target's config came from, as the dry run prints it
    drafter: dict[str, Any] | None = None
    drafter_source: str | None = None


def _read_local(path: str, field: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise PlanUnavailable(f"{field} {path!r} is neither a config.json file nor a folder holding one")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise PlanUnavailable(f"{field} {path!r} is not valid JSON: {e}") from None


def _given(value: str, table: dict, field: str) -> tuple[dict[str, Any], str]:
    """A config the job names in ``field``: a known model's name, else a local file or folder."""
    known = shapes.known_config(value, table)
    if known is not None and not Path(value).expanduser().exists():
        return known[1], f"{field} = known shape {known[0]}"
    return _read_local(value, field), f"{field} = {value}"


def _unavailable(field: str, value: str, option: str, table: dict) -> PlanUnavailable:
    known = ", ".join(r.split("/", 1)[1] for r in table)
    return PlanUnavailable(
        f"{field} {value!r}: its config.json is not read from here (submit works offline) and its folder name "
        f"matches no known shape ({known}); give a local copy with {option} PATH (or set it in the job file), "
        "or submit without a memory plan with --no-memory-check")


def plan_configs(spec) -> PlanConfigs:
    """The target's and (drafter modes) the drafter's config.json dictionaries, read offline."""
    from dflash_batch.decoder import DRAFTER_MODES

    m = spec.model
    if m.config:
        target, source = _given(m.config, shapes.TARGETS, "model.config")
    elif (known := shapes.known_config(m.target, shapes.TARGETS)) is not None:
        target, source = known[1], f"known shape {known[0]} (matched model.target {m.target!r})"
    else:
        raise _unavailable("model.target", m.target, "--model-config", shapes.TARGETS)
    if spec.decode.mode not in DRAFTER_MODES:
        return PlanConfigs(target, source)
    return PlanConfigs(target, source, *_drafter_config(spec))


def _drafter_config(spec) -> tuple[dict[str, Any], str]:
    from dflash_batch.decoder import resolve_drafter_dir

    m = spec.model
    if m.drafter_config:
        return _given(m.drafter_config, shapes.DRAFTERS, "model.drafter_config")
    if m.drafter == "default":
        try:  # the drafters shipped in this package: a local folder, no download
            folder = resolve_drafter_dir("default", m.target)
        except ValueError as e:
            raise PlanUnavailable(f"model.drafter 'default': {e}") from None
        return _read_local(str(folder), "model.drafter"), f"the drafter shipped for {m.target}"
    if (known := shapes.known_config(m.drafter, shapes.DRAFTERS)) is not None:
        return known[1], f"known shape {known[0]} (matched model.drafter {m.drafter!r})"
    raise _unavailable("model.drafter", m.drafter, "--drafter-config", shapes.DRAFTERS)
