"""Typed configs: one dataclass per component, whose fields (with help text) become CLI options.

A field is declared with :func:`option`, which stores its help in the field metadata::

    @dataclass
    class ShapesConfig:
        size: int = option(10_000, "number of images in the split")

:func:`add_options` turns such a dataclass into ``--size`` options on an argparse parser and :func:`from_args`
builds the dataclass back from the parsed namespace, so ``--help`` and the code never drift apart. Validation lives
in each dataclass's ``__post_init__`` and raises :class:`dalle.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from dalle.errors import ConfigError

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: typing.Sequence[Any] | None = None,
           cli: bool = True, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with help text; ``cli=False`` keeps it out of the command line."""
    meta = {"help": help, "choices": choices, "cli": cli}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check(cond: bool, obj: Any, field: str, message: str) -> None:
    """Raise a :class:`ConfigError` for ``obj.field`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(type(obj).__name__, field, f"{message} (got {getattr(obj, field)!r})")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _flag(prefix: str, name: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def add_options(parser: argparse.ArgumentParser, cls: type, prefix: str = "", title: str | None = None,
                exclude: typing.Collection[str] = ()) -> None:
    """Add one ``--option`` per CLI field of dataclass ``cls`` (``prefix`` namespaces them, e.g. ``data-``), except the
    fields named in ``exclude``."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True) or not f.init or f.name in exclude:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        # argparse %-formats help text (for %(default)s): a literal "56%" would break --help.
        helptext = f.metadata.get("help", "").replace("%", "%%")
        dest = (prefix + f.name).replace("-", "_")
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS}
        shown = f" (default: {default})".replace("%", "%%") if default not in (None, "", ()) else ""
        if tp is bool:
            group.add_argument(_flag(prefix, f.name), action=argparse.BooleanOptionalAction,
                               help=helptext + shown, **kwargs)
            continue
        origin = typing.get_origin(tp)
        if origin in (tuple, list):
            item = typing.get_args(tp)[0] if typing.get_args(tp) else str
            kwargs.update(nargs="*" if optional or origin is list else "+", type=item)
        elif tp in (int, float, str, Path):
            kwargs["type"] = tp
        else:
            kwargs["type"] = str
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        group.add_argument(_flag(prefix, f.name), help=helptext + shown, **kwargs)


def from_args(cls: type[T], args: argparse.Namespace, prefix: str = "", **overrides: Any) -> T:
    """Build ``cls`` from parsed options (only those given; the rest keep their defaults) plus ``overrides``."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        dest = (prefix + f.name).replace("-", "_")
        if hasattr(args, dest):
            values[f.name] = getattr(args, dest)
    hints = typing.get_type_hints(cls)
    for name, value in list(values.items()):
        tp, _ = _unwrap_optional(hints[name])
        if typing.get_origin(tp) is tuple and isinstance(value, list):
            values[name] = tuple(value)
    values.update(overrides)
    return cls(**values)


def given_as_argv(args: argparse.Namespace, cls: type, prefix: str = "",
                  exclude: typing.Collection[str] = ()) -> list[str]:
    """The options of ``cls`` that were given on the command line, written back as arguments (``--data-crop
    random``), so that a command can hand them on to the commands it runs."""
    argv: list[str] = []
    for f in dataclasses.fields(cls):
        dest = (prefix + f.name).replace("-", "_")
        if f.name in exclude or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if isinstance(value, bool):
            argv.append(_flag(prefix, f.name) if value else "--no-" + _flag(prefix, f.name)[2:])
        elif isinstance(value, tuple | list):
            argv += [_flag(prefix, f.name), *map(str, value)]
        elif value is not None:
            argv += [_flag(prefix, f.name), str(value)]
    return argv


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (paths as strings, tuples as lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if dataclasses.is_dataclass(v):
            return to_dict(v)
        return v
    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Inverse of :func:`to_dict`; unknown keys are an error naming them (a config from another version)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(cls.__name__, unknown[0], "unknown field in saved config")
    hints = typing.get_type_hints(cls)
    values = {}
    for k, v in data.items():
        tp, _ = _unwrap_optional(hints[k])
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = from_dict(tp, v)
        elif typing.get_origin(tp) is tuple and isinstance(v, list):
            v = tuple(v)
        elif tp is Path and isinstance(v, str):
            v = Path(v)
        values[k] = v
    return cls(**values)


def save_json(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
