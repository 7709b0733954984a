"""Typed, nested dataclass configs: YAML file + ``--section.key=value`` overrides + a ``--help`` that lists all.

Declare sections as dataclasses whose fields use :func:`opt` (default + help text) and validate in
``__post_init__`` (raise ``ValueError`` naming the flag, e.g. ``"--optim.lr must be > 0"``); the root
config is a dataclass whose fields are the sections::

    @dataclass
    class OptimConfig:
        lr: float = opt(1e-4, "peak learning rate")

    @dataclass
    class RunConfig:
        optim: OptimConfig = section(OptimConfig)

    cfg = parse_config(RunConfig, sys.argv[1:], prog="alum-train")

Precedence: dataclass defaults < ``--config FILE.yaml`` < command-line flags.  Both ``--optim.lr=3e-4``
and ``--optim.lr 3e-4`` work; booleans take ``true/false/yes/no/1/0`` (a bare ``--data.nsp`` means true);
lists/tuples take YAML (``[0.9, 0.98]``) or comma-separated values.  Unknown keys in YAML are errors
naming the key and the closest valid one.

Flat command lines (``alum-prep``, ``alum-launch``, ``alum-bench``) use the same :func:`opt` fields in a flat
dataclass: :func:`add_dataclass_arguments` turns its fields into ``--kebab-case`` argparse arguments and
:func:`dataclass_from_args` builds the instance (running its ``__post_init__`` checks) from the parsed namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, get_args, get_origin

import yaml

from .atomic import write_text

T = TypeVar("T")
_MISSING = object()


def opt(default: Any, help: str, *, choices: Sequence[Any] | None = None, positional: bool = False,
        required: bool = False, speed_only: bool = False, metavar: str | None = None) -> Any:
    """A config field with a default and a help text (mutable defaults are copied per instance).

    The keywords shape flat command lines (:func:`add_dataclass_arguments`): ``choices`` (the allowed values),
    ``positional`` (an argument without a flag), ``required`` (the flag must be given), ``metavar`` (the value's
    name in ``--help``).  ``speed_only`` marks an option that changes only speed or display, never the result.
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "positional": positional,
            "required": required, "speed_only": speed_only, "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, help: str | None = None) -> Any:
    """A nested config section (a dataclass) built from its own defaults."""
    return dataclasses.field(default_factory=cls, metadata={"help": help or (cls.__doc__ or "").strip()})


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (str from the CLI, or a YAML scalar/list) to the field type ``tp``."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or value is None:
            return None
    origin = get_origin(tp)
    try:
        if origin is Literal:
            choices = get_args(tp)
            if value not in choices:
                # numbers in Literal: allow "1" -> 1
                for c in choices:
                    if str(c) == str(value):
                        return c
                raise ValueError(f"--{key} must be one of {', '.join(map(str, choices))} (got {value!r})")
            return value
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "y", "on"):
                return True
            if s in ("0", "false", "no", "n", "off"):
                return False
            raise ValueError(f"--{key} must be true or false (got {value!r})")
        if tp in (int, float):
            if isinstance(value, bool):
                raise ValueError(f"--{key} must be a number (got {value!r})")
            if tp is int and isinstance(value, str):
                f = float(value)
                if not f.is_integer():
                    raise ValueError(f"--{key} must be an integer (got {value!r})")
                return int(f)
            return tp(value)
        if tp is str:
            return str(value)
        if tp is Path:
            return Path(value)
        if origin in (list, tuple, Sequence) or tp in (list, tuple):
            if isinstance(value, str):
                parsed = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v.strip()]
            else:
                parsed = list(value)
            args = get_args(tp)
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(parsed) != len(args):
                    raise ValueError(f"--{key} needs {len(args)} values (got {len(parsed)})")
                return tuple(_convert(v, a, key) for v, a in zip(parsed, args))
            elem = args[0] if args else str
            out = [_convert(v, elem, key) for v in parsed]
            return tuple(out) if origin is tuple or tp is tuple else out
        if origin is dict or tp is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError(f"--{key} must be a mapping")
            return dict(value)
    except (TypeError, ValueError) as exc:
        if str(exc).startswith("--"):
            raise
        raise ValueError(f"--{key}: cannot read {value!r} as {getattr(tp, '__name__', tp)} ({exc})") from None
    return value


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if _is_section(tp):
            out.extend(_leaves(tp, key + "."))
        else:
            out.append((key, f, tp))
    return out


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _MISSING


def _set_nested(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def config_from_dict(cls: type[T], data: dict | None, _prefix: str = "", _source: str = "config") -> T:
    """Build ``cls`` from a nested dict; unknown keys raise ``ValueError`` naming the key."""
    data = dict(data or {})
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(names), n=1)
        hint = f" (did you mean {_prefix}{close[0]}?)" if close else f" (valid: {', '.join(_prefix + n for n in names)})"
        raise ValueError(f"{_source}: unknown key {_prefix}{k}{hint}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if _is_section(tp):
            if value is None:
                value = {}
            if dataclasses.is_dataclass(value):
                kwargs[name] = value
                continue
            if not isinstance(value, dict):
                raise ValueError(f"{_source}: {_prefix}{name} must be a section (mapping), got {value!r}")
            kwargs[name] = config_from_dict(tp, value, f"{_prefix}{name}.", _source)
        else:
            kwargs[name] = _convert(value, tp, f"{_prefix}{name}")
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict:
    """Nested plain dict (tuples become lists, Paths strings) — YAML/JSON friendly."""

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return clean(dataclasses.asdict(cfg))


def save_yaml(cfg: Any, path: str | os.PathLike) -> None:
    """Write the config as YAML atomically."""
    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def load_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"--config {p}: file not found")
    try:
        with open(p, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {p}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {p}: the top level must be a mapping of sections")
    return data


def _fmt_default(v: Any) -> str:
    if v is _MISSING:
        return "required"
    if isinstance(v, str) and v == "":
        return '""'
    return str(list(v) if isinstance(v, tuple) else v)


def build_parser(cls: type, prog: str | None = None, description: str | None = None,
                 aliases: dict[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Precedence: defaults < --config YAML < flags. Use --section.key=value or --section.key value.",
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with sections of the keys below")
    alias_of = {v: k for k, v in (aliases or {}).items()}
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = _hints(cls)
    for key, f, tp in _leaves(cls):
        sect = key.rsplit(".", 1)[0] if "." in key else ""
        if sect not in groups:
            doc = ""
            if sect:
                stp = hints[sect.split(".")[0]]
                doc = (stp.__doc__ or "").strip().splitlines()[0] if stp.__doc__ else ""
            groups[sect] = parser.add_argument_group(f"[{sect}] {doc}" if sect else "options")
        base, _ = _strip_optional(tp)
        choices = get_args(base) if get_origin(base) is Literal else None
        help_text = f.metadata.get("help", "")
        extra = f" {{{', '.join(map(str, choices))}}}" if choices else ""
        flags = [f"--{key}"] + ([alias_of[key]] if key in alias_of else [])
        groups[sect].add_argument(
            *flags, dest=key, default=_MISSING, metavar="V",
            nargs="?" if base is bool else None, const="true" if base is bool else None,
            help=f"{help_text}{extra} (default: {_fmt_default(_default_of(f))})".replace("%", "%%"),
        )
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None,
                 description: str | None = None, aliases: dict[str, str] | None = None) -> T:
    """Parse ``argv`` (default ``sys.argv[1:]``) into a ``cls`` instance; errors exit with status 2.

    ``aliases`` maps extra flags to dotted keys, e.g. ``{"--model": "model.path"}``.
    """
    parser = build_parser(cls, prog, description, aliases)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    data: dict = load_yaml(args.config) if args.config else {}
    source = f"--config {args.config}" if args.config else "config"
    for key, _f, _tp in _leaves(cls):
        value = getattr(args, key)
        if value is not _MISSING:
            _set_nested(data, key, value)
    try:
        return config_from_dict(cls, data, _source=source)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable


def add_dataclass_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """Add one argument per field of the flat dataclass ``cls`` (declared with :func:`opt`) to ``parser``.

    Flags are ``--kebab-case`` of the field name (the namespace attribute is the field name).  Types come from
    the annotations: int, float, str, Path, a ``Literal`` (its values are the choices), each optionally
    ``| None``; a bool defaulting to False is a switch (``--x``), any other bool a ``--x/--no-x`` pair; a list
    takes one or more values when positional or required, else it is a repeatable flag.  The help ends with
    ``(default: X)`` unless the default is None or empty.
    """
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        meta = f.metadata
        tp, _ = _strip_optional(hints[f.name])
        default = _default_of(f)
        default = None if default is _MISSING else default
        help_text = meta.get("help", "")
        if default is not None and default != []:
            help_text += f" (default: {_fmt_default(default)})"
        kw: dict[str, Any] = {"default": default, "help": help_text.replace("%", "%%")}
        choices = meta.get("choices") or (get_args(tp) if get_origin(tp) is Literal else None)
        if choices:
            kw["choices"] = choices
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        positional, required = meta.get("positional", False), meta.get("required", False)
        if tp is bool:
            kw["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
        elif tp is list or get_origin(tp) is list:
            kw["type"] = (get_args(tp) or (str,))[0]
            if positional or required:
                kw["nargs"] = "+"
            else:
                kw["action"] = "append"
        elif choices and get_origin(tp) is Literal:
            kw["type"] = type(choices[0])
        elif tp in (int, float, str, Path):
            kw["type"] = tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for type {tp}")
        if positional:
            parser.add_argument(f.name, **kw)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, required=required, **kw)


def dataclass_from_args(cls: type[T], namespace: argparse.Namespace) -> T:
    """The ``cls`` instance of the arguments :func:`add_dataclass_arguments` added (``ValueError`` from its checks)."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.init})


def diff_configs(a: Any, b: Any, ignore: Sequence[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs (``ignore``: keys or section prefixes)."""
    da, db = config_to_dict(a), config_to_dict(b)
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}{k}.")
            return
        key = prefix[:-1]
        if any(key == i or key.startswith(i + ".") for i in ignore):
            return
        if x != y:
            out.append(key)

    walk(da, db, "")
    return out
