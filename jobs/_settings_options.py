"""Click options made from settings dataclasses: one option per field, and the field's
default, help, bounds and choices as the option's (``decoder.train._setting``).

So ``train-drafter``'s options cannot drift from ``DrafterSpec``, ``TrainConfig`` and
``DataConfig``: there is no second place where a default or a range is written.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Mapping

import click


def option_name(field: dataclasses.Field) -> str:
    """The field's flag: ``--field-name`` unless its metadata names an older one."""
    return field.metadata.get("option") or "--" + field.name.replace("_", "-")


def _int_tuple(_ctx, _param, value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _base_type(hint: Any) -> Any:
    """``int`` for ``int | None``; ``tuple`` for ``tuple[int, ...]``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _number_type(base: type, meta: Mapping[str, Any]) -> click.ParamType | type:
    """An IntRange / FloatRange with the field's bounds (and its ``none_as`` value allowed)."""
    low = meta["low"] if meta["low"] is not None else meta["above"]
    high = meta["high"] if meta["high"] is not None else meta["below"]
    if meta["none_as"] is not None and low is not None:
        low = min(low, meta["none_as"])
    if low is None and high is None:
        return base
    kind = click.IntRange if base is int else click.FloatRange
    return kind(min=low, max=high, min_open=meta["above"] is not None, max_open=meta["below"] is not None)


def _option(field: dataclasses.Field, hint: Any) -> Callable:
    """The click option of one settings field."""
    meta, default, base = field.metadata, field.default, _base_type(hint)
    name, kw = option_name(field), {"default": default, "help": meta["help"]}
    choices = meta["choices"]
    if isinstance(choices, Mapping):  # words on the command line for the field's values
        kw.update(type=click.Choice(list(choices)),
                  default=next((word for word, value in choices.items() if value == default), None))
    elif choices is not None:
        kw["type"] = click.Choice(list(choices))
    elif base is bool:
        name = name if "/" in name else f"{name}/--no-{name[2:]}"
    elif base is tuple:
        kw.update(type=str, callback=_int_tuple)
    elif base in (int, float):
        kw["type"] = _number_type(base, meta)
        kw["default"] = meta["none_as"] if default is None and meta["none_as"] is not None else default
    kw["show_default"] = kw["default"] is not None
    return click.option(name, field.name, **kw)


def settings_options(*classes: type) -> Callable[[Callable], Callable]:
    """A decorator adding one option per field of each settings dataclass in ``classes``."""
    fields = [(f, typing.get_type_hints(cls)[f.name]) for cls in classes for f in dataclasses.fields(cls)]
    names = [f.name for f, _ in fields]
    if len(set(names)) < len(names):
        raise ValueError(f"settings classes {classes} share a field name: their options would collide")

    def decorate(command: Callable) -> Callable:
        for field, hint in reversed(fields):  # click lists options in decorator order, top first
            command = _option(field, hint)(command)
        return command

    return decorate


def settings_from(cls: type, params: Mapping[str, Any]) -> Any:
    """An instance of ``cls`` from the parsed options (words mapped back to values, and the
    ``none_as`` value to None); the class checks itself."""
    values = {}
    for field in dataclasses.fields(cls):
        value, meta = params[field.name], field.metadata
        if isinstance(meta["choices"], Mapping) and value is not None:
            value = meta["choices"][value]
        if meta["none_as"] is not None and value == meta["none_as"]:
            value = None
        values[field.name] = value
    return cls(**values)
