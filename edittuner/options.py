"""Command-line options generated from the config dataclasses, so each default, allowed value and help text is
stated once, on its field. Light on purpose (no torch): `edittuner --help` builds every parser from this.

A field's ``metadata`` may hold: ``help``; ``flag`` (when the option is not ``--<field name>``); ``type`` (one of
the value types below, where the annotation's int / float / bool is not enough); ``choices``; ``action``
(``store_true``, ``append``); ``cli_default`` (where the command line's default differs from the field's);
``cli=False`` (no option); and on a nested config's field, ``group`` (the title of its options' group).
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Any, get_args, get_type_hints

from .errors import EditTunerError, check_seed


# ---- value types -------------------------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def seed_int(text: str) -> int:
    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    except EditTunerError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--seed ")) from None


def on_off(text: str) -> bool:
    if text.lower() in ("on", "true", "1", "yes"):
        return True
    if text.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: use on or off")


def float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 0,0.25,0.5,0.75") from None


def name_list(text: str) -> tuple[str, ...] | None:
    return tuple(text.split(",")) if text else None   # empty: the field's default (e.g. the preset's targets)


_TYPES = {int: int, float: float, bool: on_off}


# ---- dataclass <-> argparse --------------------------------------------------------------------------------------

def _flag(f: Field) -> str:
    return f.metadata.get("flag", f"--{f.name}")


def _exposed(f: Field) -> bool:
    return f.metadata.get("cli", True)


def _without_none(hint: Any) -> Any:
    """``int | None`` -> ``int``; any other hint as it is."""
    rest = [a for a in get_args(hint) if a is not type(None)] if isinstance(hint, UnionType) else []
    return rest[0] if len(rest) == 1 else hint


def _argparse_kwargs(f: Field, hint: Any) -> dict:
    """add_argument's keywords for field ``f``: default (or required), type or action, choices, help."""
    meta = f.metadata
    if f.default is MISSING and f.default_factory is MISSING:
        kwargs = {"required": True}
    else:
        kwargs = {"default": meta.get("cli_default", f.default)}
    if "action" in meta:
        kwargs["action"] = meta["action"]
    else:
        kwargs["type"] = meta.get("type", _TYPES.get(_without_none(hint)))
    if "choices" in meta:
        kwargs["choices"] = list(meta["choices"])
    return {**kwargs, "help": meta.get("help")}


def add_options(parser: argparse.ArgumentParser, config: type, group=None, *, only: tuple[str, ...] | None = None,
                helps: dict[str, str] | None = None, seen: set[str] | None = None) -> None:
    """An option per field of the dataclass ``config``, in ``group`` (default: the parser); a nested config's
    fields go in the group its field names. ``only``: just these fields; ``helps``: other help texts by field
    name. A flag two nested configs share (flow's and the bridge's loss weights) is added once and sets both."""
    seen = set() if seen is None else seen
    hints = get_type_hints(config)
    for f in fields(config):
        if only is not None and f.name not in only or not _exposed(f):
            continue
        if is_dataclass(hints[f.name]):
            title = f.metadata.get("group")
            add_options(parser, hints[f.name], parser.add_argument_group(title) if title else group, seen=seen)
        elif _flag(f) not in seen:
            seen.add(_flag(f))
            kwargs = _argparse_kwargs(f, hints[f.name])
            if helps and f.name in helps:
                kwargs["help"] = helps[f.name]
            (group or parser).add_argument(_flag(f), **kwargs)


def _field_value(hint: Any, value: Any) -> Any:
    """A parsed option as its field holds it: paths become Path (empty: None, where the field allows None)."""
    if hint == Path | None:
        return Path(value) if value else None
    if hint == tuple[Path, ...]:
        return tuple(Path(p) for p in value or ())
    return Path(value) if hint is Path else value


def from_args(config: type, args: argparse.Namespace, **given):
    """The dataclass ``config`` from parsed options: each field from its option, a nested config from its own
    fields, a field without an option at its default; ``given`` sets fields directly."""
    hints = get_type_hints(config)
    values = dict(given)
    for f in fields(config):
        if f.name in given or not _exposed(f):
            continue
        if is_dataclass(hints[f.name]):
            values[f.name] = from_args(hints[f.name], args)
        else:
            values[f.name] = _field_value(hints[f.name], getattr(args, _flag(f).removeprefix("--")))
    return config(**values)
