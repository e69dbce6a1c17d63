"""JSON schemas from Python type hints, and a function's parameters schema from its signature and docstring."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import PurePath
from typing import Any, Literal, NamedTuple

import attrs

from ..errors import ToolError
from .docstrings import parse_docstring

__all__ = ["FunctionSchema", "function_schema", "is_typeddict", "is_union", "schema_for", "type_hints"]


def is_typeddict(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__annotations__") and hasattr(tp, "__total__")


def is_union(tp: Any) -> bool:
    """`Union[...]`, `Optional[...]` or `A | B`."""
    return typing.get_origin(tp) is typing.Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType))


def _with_null(schema: dict[str, Any]) -> dict[str, Any]:
    t = schema.get("type")
    if isinstance(t, str) and set(schema) <= {"type", "description", "items", "properties", "required"}:
        return {**schema, "type": [t, "null"]}
    if isinstance(t, list) and "null" not in t:
        return {**schema, "type": [*t, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _json_type(value: object) -> str | None:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return None


def schema_for(tp: Any, seen: frozenset[Any] = frozenset()) -> dict[str, Any]:
    """A JSON schema for a type annotation; `seen` stops recursion through self-referencing classes."""
    if tp is inspect.Parameter.empty or tp is Any or tp is object:
        return {}
    if tp is None or tp is type(None):
        return {"type": "null"}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        schema = schema_for(args[0], seen)
        text = next((a for a in args[1:] if isinstance(a, str)), None)
        return {**schema, "description": text} if text else schema
    if origin is Literal:
        values = [v.value if isinstance(v, enum.Enum) else v for v in args]
        kinds = {_json_type(v) for v in values}
        if len(kinds) == 1 and None not in kinds:
            return {"type": kinds.pop(), "enum": values}
        return {"enum": values}
    if is_union(tp):
        members = [a for a in args if a is not type(None)]
        nullable = len(members) != len(args)
        if len(members) == 1:
            inner = schema_for(members[0], seen)
            return _with_null(inner) if nullable else inner
        any_of = [schema_for(m, seen) for m in members]
        if nullable:
            any_of.append({"type": "null"})
        return {"anyOf": any_of}
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is _dt.datetime:
        return {"type": "string", "format": "date-time"}
    if tp is _dt.date:
        return {"type": "string", "format": "date"}
    if tp is _dt.time:
        return {"type": "string", "format": "time"}
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return {"type": "string"}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        kinds = {_json_type(v) for v in values}
        return {"type": kinds.pop(), "enum": values} if len(kinds) == 1 and None not in kinds else {"enum": values}
    if origin in (list, set, frozenset, Sequence, Iterable):
        return {"type": "array", "items": schema_for(args[0], seen) if args else {}}
    if tp in (list, set, frozenset, tuple):
        return {"type": "array"}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": schema_for(args[0], seen)}
        items = [schema_for(a, seen) for a in args]
        return {"type": "array", "prefixItems": items, "minItems": len(items), "maxItems": len(items)}
    if origin in (dict, Mapping, typing.Mapping) or tp in (dict,):
        if len(args) == 2 and args[1] is not Any:
            return {"type": "object", "additionalProperties": schema_for(args[1], seen)}
        return {"type": "object"}
    if isinstance(tp, type):
        return _class_schema(tp, seen)
    raise ToolError(f"cannot describe the type {tp!r} as a JSON schema")


def _class_schema(tp: type, seen: frozenset[Any]) -> dict[str, Any]:
    """TypedDicts, dataclasses and attrs classes as objects; pydantic models describe themselves."""
    if tp in seen:
        return {"type": "object"}
    if is_typeddict(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        required = sorted(getattr(tp, "__required_keys__", set(hints)), key=list(hints).index)
        doc = parse_docstring(tp.__doc__)
        return _object_schema({k: (v, doc.params.get(k, "")) for k, v in hints.items()}, required, seen | {tp})
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        doc = parse_docstring(tp.__doc__)
        fields = [f for f in dataclasses.fields(tp) if f.init]
        required = [
            f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        return _object_schema(
            {f.name: (hints.get(f.name, Any), doc.params.get(f.name, "")) for f in fields}, required, seen | {tp}
        )
    if attrs.has(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        doc = parse_docstring(tp.__doc__)
        afields = [a for a in attrs.fields(tp) if a.init]
        required = [a.alias or a.name for a in afields if a.default is attrs.NOTHING]
        return _object_schema(
            {(a.alias or a.name): (hints.get(a.name, a.type or Any), doc.params.get(a.name, "")) for a in afields},
            required,
            seen | {tp},
        )
    schema_fn = getattr(tp, "model_json_schema", None)
    if callable(schema_fn):
        result = schema_fn()
        if isinstance(result, dict):
            return result
    raise ToolError(f"cannot describe the type {tp!r} as a JSON schema")


def _object_schema(fields: dict[str, tuple[Any, str]], required: list[str], seen: frozenset[Any]) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for name, (tp, desc) in fields.items():
        schema = schema_for(tp, seen)
        if desc and "description" not in schema:
            schema = {**schema, "description": desc}
        props[name] = schema
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    return out


def type_hints(target: Callable[..., Any], signature: inspect.Signature, fn_name: str) -> dict[str, Any]:
    """The function's resolved annotations; names that cannot be resolved are reported per parameter."""
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:
        pass
    namespace = {**vars(typing), **getattr(target, "__globals__", {})}
    hints: dict[str, Any] = {}
    for param in signature.parameters.values():
        annotation = param.annotation
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)  # the function's own annotation text
            except Exception:
                raise ToolError(
                    f"{fn_name}: cannot resolve the type {annotation!r} of parameter {param.name!r} "
                    "(define it at module level)"
                ) from None
        hints[param.name] = annotation
    return hints


class FunctionSchema(NamedTuple):
    description: str
    parameters: dict[str, Any]


def function_schema(fn: Callable[..., Any], fn_name: str) -> FunctionSchema:
    """The docstring's summary and the JSON schema of the parameters of a typed function."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ToolError(f"cannot read the signature of {fn_name}: {exc}") from None
    hints = type_hints(target, signature, fn_name)
    doc = parse_docstring(inspect.getdoc(fn) if not isinstance(fn, functools.partial) else target.__doc__)
    props: dict[str, Any] = {}
    required: list[str] = []
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.kind == param.POSITIONAL_ONLY:
            raise ToolError(f"{fn_name}: positional-only parameter {param.name!r} cannot be passed by name")
        try:
            schema = schema_for(hints.get(param.name, param.annotation))
        except ToolError as exc:
            raise ToolError(f"{fn_name}, parameter {param.name!r}: {exc}") from None
        if doc.params.get(param.name) and "description" not in schema:
            schema = {**schema, "description": doc.params[param.name]}
        props[param.name] = schema
        if param.default is param.empty:
            required.append(param.name)
    parameters: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        parameters["required"] = required
    return FunctionSchema(doc.description, parameters)
