"""One field of a training settings dataclass, with what its command-line option needs.

A field made with ``setting`` carries its help text, its bounds and its choices in its
metadata. The dataclass checks itself with ``problems``, and ``dflash-batch train-drafter``
builds one option per field from the same metadata. So a default, its help and its check
are written once, beside the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


class SettingsError(ValueError):
    """Settings that cannot work; the message names each field and what is wrong with it."""


def setting(default: Any, help: str, *, option: str | None = None, low: float | None = None,
            above: float | None = None, high: float | None = None, below: float | None = None,
            choices: tuple | Mapping[str, Any] | None = None, none_as: Any = None) -> Any:
    """A dataclass field whose metadata describes its option.

    ``option``: the flag's name when it is not ``--field-name`` (older names stay valid).
    ``low`` <= value, ``above`` < value, value <= ``high``, value < ``below``: the bounds.
    ``choices``: the allowed values, or a {word on the command line: value} map.
    ``none_as``: the command-line value that stands for None (e.g. 0 for "no limit").
    """
    meta = {"help": help, "option": option, "low": low, "above": above, "high": high, "below": below,
            "choices": choices, "none_as": none_as}
    return dataclasses.field(default=default, metadata=meta)


def allowed(choices: tuple | Mapping[str, Any]) -> tuple:
    """The field values ``choices`` allows."""
    return tuple(choices.values()) if isinstance(choices, Mapping) else tuple(choices)


def _problem(name: str, value: Any, meta: Mapping[str, Any]) -> str | None:
    """What is wrong with ``value`` for field ``name``, or None. None values are never checked:
    a field that may be None says what None means in its help."""
    if value is None:
        return None
    if meta.get("choices") is not None and value not in allowed(meta["choices"]):
        return f"{name} must be one of {'/'.join(map(str, allowed(meta['choices'])))}, got {value!r}"
    if meta.get("low") is not None and not value >= meta["low"]:
        return f"{name} must be >= {meta['low']}, got {value!r}"
    if meta.get("above") is not None and not value > meta["above"]:
        return f"{name} must be > {meta['above']}, got {value!r}"
    if meta.get("high") is not None and not value <= meta["high"]:
        return f"{name} must be <= {meta['high']}, got {value!r}"
    if meta.get("below") is not None and not value < meta["below"]:
        return f"{name} must be < {meta['below']}, got {value!r}"
    return None


def check(settings: Any) -> None:
    """Raises ``SettingsError`` listing every field of ``settings`` outside its bounds or choices."""
    problems = [p for f in dataclasses.fields(settings)
                if (p := _problem(f.name, getattr(settings, f.name), f.metadata)) is not None]
    if problems:
        raise SettingsError(f"{type(settings).__name__}: " + "; ".join(problems))
