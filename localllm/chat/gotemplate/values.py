"""Go values as templates see them, and how fmt prints them.

A Go struct (`GoStruct`) has named fields, methods and its own JSON; Go maps and slices may have a
String() method (`GoMap`, `GoList`); `OrderedMap` is Ollama's map that keeps its order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ...gojson import Marshaler, go_format_float, go_json

__all__ = ["GoList", "GoMap", "GoStruct", "OrderedMap", "go_fmt", "go_kind", "go_type", "stringer", "truth"]


class GoStruct(Marshaler):
    """A Go struct (or pointer to one) as templates see it: named fields, optional String() and JSON forms."""

    __slots__ = ("fields", "json", "methods", "pointer", "string", "type_name")

    def __init__(
        self,
        type_name: str,
        fields: dict[str, Any],
        *,
        pointer: bool = False,
        string: Callable[[], str] | None = None,
        json: Callable[[], str] | None = None,
        methods: dict[str, Callable[[], Any]] | None = None,
    ) -> None:
        self.type_name = type_name
        self.fields = fields
        self.pointer = pointer
        self.string = string
        self.json = json
        self.methods = methods or {}

    def marshal_json(self) -> str:
        """Its own JSON form, else its fields in order, as encoding/json writes a struct."""
        if self.json is not None:
            return self.json()
        return "{" + ",".join(go_json(k) + ":" + go_json(v) for k, v in self.fields.items()) + "}"


class GoMap(dict[str, Any]):
    """A Go map: fmt and encoding/json sort its keys; `string` is its String() method, if it has one."""

    string: Callable[[], str] | None = None


class OrderedMap(dict[str, Any], Marshaler):
    """A map that keeps insertion order when marshalled to JSON (Ollama's ordered maps)."""

    def marshal_json(self) -> str:
        return "{" + ",".join(go_json(str(k)) + ":" + go_json(v) for k, v in self.items()) + "}"


class GoList(list[Any]):
    """A Go slice with a String() method."""

    string: Callable[[], str] | None = None


def stringer(value: Any) -> Callable[[], str] | None:
    """The value's String() method, if it has one."""
    if isinstance(value, GoStruct):
        return value.string
    if isinstance(value, (GoMap, GoList)):
        return value.string
    return None


def go_fmt(value: Any) -> str:
    """A value as fmt.Sprint prints it."""
    s = stringer(value)
    if s is not None:
        return s()
    if value is None:
        return "<nil>"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return go_format_float(value)
    if isinstance(value, str):
        return value
    if isinstance(value, GoStruct):
        body = "{" + " ".join(go_fmt(v) for v in value.fields.values()) + "}"
        return "&" + body if value.pointer else body
    if isinstance(value, Mapping):
        keys = list(value) if isinstance(value, OrderedMap) else sorted(value, key=str)
        return "map[" + " ".join(f"{go_fmt(k)}:{go_fmt(value[k])}" for k in keys) + "]"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(go_fmt(v) for v in value) + "]"
    return str(value)


def go_type(value: Any) -> str:
    """The Go type name of a value, as `%T` and error messages write it."""
    if isinstance(value, GoStruct):
        return ("*" if value.pointer else "") + value.type_name
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "map[string]interface {}"
    if isinstance(value, (list, tuple)):
        return "[]interface {}"
    return type(value).__name__


def truth(value: Any) -> bool:
    """Whether `if` takes the value as true: not nil, false, zero or empty."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    if isinstance(value, (str, list, tuple, Mapping)):
        return len(value) > 0
    return True


def go_kind(value: Any) -> str:
    """The reflect kind comparisons go by: "invalid" (nil), "bool", "int", "float", "string" or "other"."""
    if value is None:
        return "invalid"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    return "other"
