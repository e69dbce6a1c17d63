"""A call's arguments: checked against the function's signature and converted from JSON to Python values."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import functools
import inspect
import re
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import PurePath
from typing import Any, Literal

import attrs

from ..errors import ToolError
from .schema import is_typeddict, is_union, type_hints

__all__ = ["bind_arguments", "convert"]


def convert(value: Any, tp: Any) -> Any:
    """Coerce a JSON value to an annotated Python type, where that is unambiguous."""
    if tp is inspect.Parameter.empty or tp is Any or value is None:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return convert(value, args[0])
    if is_union(tp):
        members = [a for a in args if a is not type(None)]
        for m in members:
            try:
                converted = convert(value, m)
            except (TypeError, ValueError, ToolError):
                continue
            if _matches(converted, m):
                return converted
        return value
    if origin is Literal:
        return value
    if tp is int and isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        return float(value)
    if tp is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if tp in (_dt.datetime, _dt.date, _dt.time) and isinstance(value, str):
        return tp.fromisoformat(value)
    if isinstance(tp, type) and issubclass(tp, PurePath) and isinstance(value, str):
        return tp(value)
    if origin in (list, set, frozenset, Sequence, typing.Sequence, Iterable) and isinstance(value, list):
        items = [convert(v, args[0]) for v in value] if args else value
        return set(items) if origin is set else frozenset(items) if origin is frozenset else list(items)
    if origin is tuple and isinstance(value, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(v, args[0]) for v in value)
        return tuple(convert(v, a) for v, a in zip(value, args, strict=False)) if args else tuple(value)
    if origin in (dict, Mapping, typing.Mapping) and isinstance(value, dict) and len(args) == 2:
        return {k: convert(v, args[1]) for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, dict):
        if is_typeddict(tp):
            hints = typing.get_type_hints(tp)
            return {k: convert(v, hints.get(k, Any)) for k, v in value.items()}
        if dataclasses.is_dataclass(tp) or attrs.has(tp):
            hints = typing.get_type_hints(tp)
            return tp(**{k: convert(v, hints.get(k, Any)) for k, v in value.items()})
        validate = getattr(tp, "model_validate", None)
        if callable(validate):
            return validate(value)
    return value


def _matches(value: Any, tp: Any) -> bool:
    if typing.get_origin(tp) is not None or not isinstance(tp, type):
        return True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if is_typeddict(tp):
        return isinstance(value, dict)
    return isinstance(value, tp)


def bind_arguments(fn: Callable[..., Any], tool_name: str, arguments: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check a call's arguments against `fn`'s signature and convert them to the annotated Python types."""
    arguments = dict(arguments or {})
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return arguments
    target = fn.func if isinstance(fn, functools.partial) else fn
    try:
        hints = type_hints(target, signature, tool_name)
    except ToolError:
        hints = {}
    params = signature.parameters
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in arguments if k not in params or params[k].kind in (params[k].VAR_POSITIONAL,)]
    if unknown and not takes_kwargs:
        raise ToolError(f"unexpected argument(s) for {tool_name}: {', '.join(sorted(unknown))}")
    missing = [
        p.name
        for p in params.values()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in arguments
    ]
    if missing:
        raise ToolError(f"missing required argument(s) for {tool_name}: {', '.join(missing)}")
    bound = {}
    for key, value in arguments.items():
        annotation = hints.get(key, params[key].annotation if key in params else Any)
        try:
            bound[key] = convert(value, annotation)
        except (TypeError, ValueError) as exc:
            raise ToolError(f"argument {key!r} of {tool_name}: {exc}") from None
    return bound
