"""Structured outputs: JSON schemas turned into GBNF grammars for llama.cpp's sampler.

`format="json"` constrains the reply to one JSON object (as Ollama does);
`format=<JSON schema>` constrains it to that schema. The translation follows
llama.cpp's conventions (bounded whitespace, at most 16 integer digits,
`additionalProperties` false unless the schema says otherwise) with two
differences: properties come out in the order the schema declares them, and
anything that cannot be enforced — an unknown keyword, `pattern`, `not`, an
impossible range — raises `InvalidFormat` here, before a grammar ever reaches
llama.cpp (where a bad grammar can abort the process).

`tool_call_grammar(tools)` forces a single `{"name": ..., "arguments": ...}`
call to one of the given tools, for models without native tool calling.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InvalidFormat

__all__ = [
    "JSON_GBNF",
    "JSON_VALUE_GBNF",
    "format_to_grammar",
    "schema_to_gbnf",
    "tool_call_grammar",
]

_PRIMITIVES: dict[str, str] = {
    "ws": '| " " | "\\n" [ \\t]{0,20}',
    "char": '[^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": '"\\"" char* "\\"" ws',
    "integral-part": "[0] | [1-9] [0-9]{0,15}",
    "decimal-part": "[0-9]{1,16}",
    "number": '"-"? integral-part ("." decimal-part)? ([eE] [-+]? integral-part)? ws',
    "integer": '"-"? integral-part ws',
    "boolean": '("true" | "false") ws',
    "null": '"null" ws',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" ws (string ":" ws value ("," ws string ":" ws value)*)? "}" ws',
    "array": '"[" ws (value ("," ws value)*)? "]" ws',
    "date": '[0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [1-2] [0-9] | "3" [0-1])',
    "time": '([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{3})? '
    '("Z" | ("+" | "-") ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])',
    "date-string": '"\\"" date "\\"" ws',
    "time-string": '"\\"" time "\\"" ws',
    "date-time-string": '"\\"" date "T" time "\\"" ws',
    "uuid-string": '"\\"" [0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" '
    '[0-9a-fA-F]{12} "\\"" ws',
}
_DEPENDS: dict[str, tuple[str, ...]] = {
    "string": ("char", "ws"),
    "number": ("integral-part", "decimal-part", "ws"),
    "integer": ("integral-part", "ws"),
    "boolean": ("ws",),
    "null": ("ws",),
    "value": ("object", "array", "string", "number", "boolean", "null"),
    "object": ("string", "value", "ws"),
    "array": ("value", "ws"),
    "date-string": ("date", "ws"),
    "time-string": ("time", "ws"),
    "date-time-string": ("date", "time", "ws"),
    "uuid-string": ("ws",),
}


def _grammar(root: str, names: Sequence[str]) -> str:
    rules: dict[str, str] = {}

    def need(name: str) -> None:
        if name in rules:
            return
        rules[name] = _PRIMITIVES[name]
        for dep in _DEPENDS.get(name, ()):
            need(dep)

    for name in names:
        need(name)
    return f"root ::= {root}\n" + "".join(f"{k} ::= {v}\n" for k, v in rules.items())


JSON_GBNF = _grammar("object", ["object"])
"""Any JSON object (Ollama's `format: "json"`)."""

JSON_VALUE_GBNF = _grammar("value", ["value"])
"""Any JSON value."""

_ANNOTATIONS = {
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "$anchor", "readOnly",
    "writeOnly", "deprecated", "contentMediaType", "contentEncoding", "$defs", "definitions",
}  # fmt: skip
_TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")
_STRING_KEYS = {"minLength", "maxLength", "format", "pattern"}
_NUMBER_KEYS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
_OBJECT_KEYS = {"properties", "required", "additionalProperties", "minProperties", "maxProperties",
                "patternProperties", "propertyNames", "dependentRequired", "dependentSchemas",
                "unevaluatedProperties"}  # fmt: skip
_ARRAY_KEYS = {"items", "prefixItems", "minItems", "maxItems", "uniqueItems", "contains", "minContains",
               "maxContains", "additionalItems", "unevaluatedItems"}  # fmt: skip
_UNSUPPORTED = {
    "pattern": "regular expression patterns",
    "patternProperties": "patternProperties",
    "propertyNames": "propertyNames",
    "minProperties": "minProperties",
    "maxProperties": "maxProperties",
    "dependentRequired": "dependentRequired",
    "dependentSchemas": "dependentSchemas",
    "unevaluatedProperties": "unevaluatedProperties",
    "unevaluatedItems": "unevaluatedItems",
    "contains": "contains",
    "minContains": "minContains",
    "maxContains": "maxContains",
    "multipleOf": "multipleOf",
    "not": "not",
    "if": "if/then/else",
    "then": "if/then/else",
    "else": "if/then/else",
}
_KNOWN = (
    _ANNOTATIONS | _STRING_KEYS | _NUMBER_KEYS | _OBJECT_KEYS | _ARRAY_KEYS | set(_UNSUPPORTED)
    | {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "nullable"}
)  # fmt: skip
_FORMATS = {"date": "date-string", "time": "time-string", "date-time": "date-time-string", "uuid": "uuid-string"}
_MAX_REPEAT = 1000
_MAX_DIGITS = 16


def _literal(text: str) -> str:
    """A GBNF string literal matching `text` exactly."""
    out = ['"']
    for c in text:
        if c == '"':
            out.append('\\"')
        elif c == "\\":
            out.append("\\\\")
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02X}")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def _class_char(c: str) -> str:
    if c.isascii() and c.isalnum():
        return c
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02X}"
    if code < 0x10000:
        return f"\\u{code:04X}"
    return f"\\U{code:08X}"


def _json_literal(value: Any) -> str:
    return _literal(json.dumps(value, ensure_ascii=False, separators=(",", ":"))) + " ws"


# -- integer ranges ---------------------------------------------------------------------------------------------------


def _same_length(lo: str, hi: str) -> list[str]:
    """Alternatives matching the decimal strings from lo to hi, both of the same length."""
    if lo == hi:
        return [_literal(lo)]
    if len(lo) == 1:
        return [f"[{lo}-{hi}]"]
    if lo[0] == hi[0]:
        return [f"{_literal(lo[0])} ({' | '.join(_same_length(lo[1:], hi[1:]))})"]
    n = len(lo) - 1
    alts: list[str] = []
    first = int(lo[0])
    if lo[1:] != "0" * n:
        alts.append(f"{_literal(lo[0])} ({' | '.join(_same_length(lo[1:], '9' * n))})")
        first += 1
    last = int(hi[0])
    tail_hi = hi[1:] != "9" * n
    if tail_hi:
        last -= 1
    if first <= last:
        head = _literal(str(first)) if first == last else f"[{first}-{last}]"
        alts.append(f"{head} [0-9]{{{n}}}")
    if tail_hi:
        alts.append(f"{_literal(hi[0])} ({' | '.join(_same_length('0' * n, hi[1:]))})")
    return alts


def _nonnegative(lo: int, hi: int | None) -> list[str]:
    """Alternatives matching the integers lo..hi (hi None: unbounded, up to 16 digits), lo >= 0."""
    alts: list[str] = []
    top = hi if hi is not None else 10**_MAX_DIGITS - 1
    for length in range(len(str(lo)), len(str(top)) + 1):
        start = max(lo, 10 ** (length - 1) if length > 1 else 0)
        end = min(top, 10**length - 1)
        if start > end:
            continue
        if hi is None and start == 10 ** (length - 1) and length > len(str(lo)):
            alts.append(f"[1-9] [0-9]{{{length - 1},{_MAX_DIGITS - 1}}}" if length < _MAX_DIGITS else "[1-9] [0-9]{15}")
            break
        alts.extend(_same_length(str(start), str(end)))
    return alts


def _integer_range(lo: int | None, hi: int | None) -> str:
    alts: list[str] = []
    if lo is None or lo < 0:
        neg_lo = max(1, -hi) if hi is not None else 1
        neg_hi = -lo if lo is not None else None
        if neg_hi is None or neg_lo <= neg_hi:
            alts.append(f'"-" ({" | ".join(_nonnegative(neg_lo, neg_hi))})')
    if hi is None or hi >= 0:
        alts.extend(_nonnegative(max(lo or 0, 0), hi))
    return "(" + " | ".join(alts) + ") ws"


# -- the translator ---------------------------------------------------------------------------------------------------


class _Trie:
    __slots__ = ("children", "end")

    def __init__(self) -> None:
        self.children: dict[str, _Trie] = {}
        self.end = False


class _Converter:
    def __init__(self, document: Any, *, prefix: str, rules: dict[str, str], strict: bool) -> None:
        self.document = document
        self.prefix = prefix
        self.rules = rules
        self.strict = strict
        self.primitives: set[str] = set()
        self.ref_rules: dict[str, str] = {}
        self.unguarded: set[str] = set()

    # helpers ----------------------------------------------------------------------------------------------------

    def fail(self, path: str, message: str) -> InvalidFormat:
        return InvalidFormat(f"JSON schema at {path}: {message}")

    def prim(self, name: str) -> str:
        self.primitives.add(name)
        return name

    def new_rule(self, hint: str, body: str) -> str:
        base = re.sub(r"[^A-Za-z0-9-]+", "-", hint).strip("-") or "rule"
        base = (self.prefix + base) if not base.startswith(self.prefix) else base
        name, n = base, 1
        while name in self.rules or name in _PRIMITIVES or name == "root":
            n += 1
            name = f"{base}-{n}"
        self.rules[name] = body
        return name

    def check_int(self, schema: Mapping[str, Any], key: str, path: str) -> int | None:
        value = schema.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
            raise self.fail(path, f"{key} must be a non-negative integer, got {value!r}")
        return int(value)

    # dispatch ---------------------------------------------------------------------------------------------------

    def visit(self, schema: Any, path: str, hint: str) -> str:
        if schema is True or (isinstance(schema, Mapping) and not (set(schema) - _ANNOTATIONS)):
            return self.prim("value")
        if schema is False:
            raise self.fail(path, "the schema `false` matches nothing")
        if not isinstance(schema, Mapping):
            raise self.fail(path, f"a schema must be an object or a boolean, got {type(schema).__name__}")
        for key in schema:
            if not isinstance(key, str):
                raise self.fail(path, f"keyword {key!r} is not a string")
            if key in _UNSUPPORTED:
                if self.strict:
                    raise self.fail(path, f"{_UNSUPPORTED[key]} ({key}) cannot be enforced by a grammar")
            elif key not in _KNOWN and not key.startswith("x-") and self.strict:
                raise self.fail(path, f"unsupported keyword {key!r}")
        if "$ref" in schema:
            return self.visit_ref(schema, path, hint)
        if "allOf" in schema:
            return self.visit_all_of(schema, path, hint)
        if schema.get("nullable") is True:
            rest = {k: v for k, v in schema.items() if k != "nullable"}
            return self.alternatives([self.visit(rest, path, hint), self.prim("null")], hint)
        if "const" in schema:
            self.prim("ws")
            return _json_literal(schema["const"])
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise self.fail(path, "enum must be a non-empty array")
            self.prim("ws")
            return self.alternatives([_json_literal(v) for v in values], hint)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.visit_any_of(schema, key, path, hint)
        return self.visit_typed(schema, path, hint)

    def alternatives(self, alts: list[str], hint: str) -> str:
        unique = list(dict.fromkeys(alts))
        if len(unique) == 1:
            return unique[0]
        return self.new_rule(hint, " | ".join(unique))

    def visit_any_of(self, schema: Mapping[str, Any], key: str, path: str, hint: str) -> str:
        subs = schema[key]
        if not isinstance(subs, list) or not subs:
            raise self.fail(path, f"{key} must be a non-empty array")
        extra = {k: v for k, v in schema.items() if k not in _ANNOTATIONS and k != key}
        if extra and self.strict:
            raise self.fail(path, f"{key} combined with {', '.join(sorted(extra))} is not supported")
        alts = [self.visit(sub, f"{path}/{key}/{i}", f"{hint}-{i}") for i, sub in enumerate(subs)]
        return self.alternatives(alts, hint)

    def visit_all_of(self, schema: Mapping[str, Any], path: str, hint: str) -> str:
        subs = schema["allOf"]
        if not isinstance(subs, list) or not subs:
            raise self.fail(path, "allOf must be a non-empty array")
        outer = {k: v for k, v in schema.items() if k != "allOf"}
        resolved = [self.resolve(sub, f"{path}/allOf/{i}") for i, sub in enumerate(subs)]
        if len(resolved) == 1 and not (set(outer) - _ANNOTATIONS):
            return self.visit(resolved[0], f"{path}/allOf/0", hint)
        merged: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
        for i, sub in enumerate([outer, *resolved]):
            if not isinstance(sub, Mapping):
                raise self.fail(f"{path}/allOf/{i}", "allOf members must be object schemas")
            kinds = set(sub) - _ANNOTATIONS - {"type", "properties", "required", "additionalProperties"}
            if kinds or sub.get("type", "object") != "object":
                raise self.fail(path, "allOf is only supported for merging object schemas")
            merged["properties"].update(sub.get("properties") or {})
            merged["required"].extend(r for r in sub.get("required") or [] if r not in merged["required"])
            if "additionalProperties" in sub:
                merged["additionalProperties"] = sub["additionalProperties"]
        return self.visit(merged, path, hint)

    def resolve(self, schema: Any, path: str) -> Any:
        seen = set()
        while isinstance(schema, Mapping) and "$ref" in schema and not (set(schema) - _ANNOTATIONS - {"$ref"}):
            ref = schema["$ref"]
            if ref in seen:
                raise self.fail(path, f"$ref {ref!r} refers to itself")
            seen.add(ref)
            schema = self.lookup(ref, path)
        return schema

    def lookup(self, ref: Any, path: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise self.fail(path, f"only local $ref (#/...) is supported, got {ref!r}")
        target = self.document
        pointer = ref[1:]
        if pointer and not pointer.startswith("/"):
            raise self.fail(path, f"unsupported $ref {ref!r}")
        for raw in pointer.split("/")[1:] if pointer else []:
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(target, Mapping) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise self.fail(path, f"$ref {ref!r} does not resolve")
        return target

    def visit_ref(self, schema: Mapping[str, Any], path: str, hint: str) -> str:
        ref = schema["$ref"]
        extra = set(schema) - _ANNOTATIONS - {"$ref"}
        if extra and self.strict:
            raise self.fail(path, f"$ref combined with {', '.join(sorted(extra))} is not supported")
        if ref in self.unguarded:
            raise self.fail(path, f"$ref {ref!r} recurses without consuming any text")
        if ref in self.ref_rules:
            return self.ref_rules[ref]
        target = self.lookup(ref, path)
        name = self.new_rule(ref.rsplit("/", 1)[-1] or "root-ref", "")
        self.ref_rules[ref] = name
        self.unguarded.add(ref)
        try:
            self.rules[name] = self.visit(target, ref, name)
        finally:
            self.unguarded.discard(ref)
        return name

    def visit_typed(self, schema: Mapping[str, Any], path: str, hint: str) -> str:
        t = schema.get("type")
        if t is None:
            present = set(schema)
            if present & _OBJECT_KEYS:
                t = "object"
            elif present & _ARRAY_KEYS:
                t = "array"
            elif present & _STRING_KEYS:
                t = "string"
            elif present & _NUMBER_KEYS:
                t = "number"
            else:
                return self.prim("value")
        if isinstance(t, list):
            if not t or not all(isinstance(x, str) for x in t):
                raise self.fail(path, "type must be a string or a non-empty array of strings")
            alts = [self.visit_typed({**schema, "type": x}, path, f"{hint}-{x}") for x in dict.fromkeys(t)]
            return self.alternatives(alts, hint)
        if t not in _TYPES:
            raise self.fail(path, f"unknown type {t!r}")
        if t == "object":
            return self.visit_object(schema, path, hint)
        if t == "array":
            return self.visit_array(schema, path, hint)
        if t == "string":
            return self.visit_string(schema, path, hint)
        if t == "integer":
            return self.visit_integer(schema, path, hint)
        if t == "number":
            return self.visit_number(schema, path)
        return self.prim(t)

    # types ------------------------------------------------------------------------------------------------------

    def visit_string(self, schema: Mapping[str, Any], path: str, hint: str) -> str:
        fmt = schema.get("format")
        lo = self.check_int(schema, "minLength", path) or 0
        hi = self.check_int(schema, "maxLength", path)
        if hi is not None and hi < lo:
            raise self.fail(path, f"maxLength {hi} is less than minLength {lo}")
        if isinstance(fmt, str) and fmt in _FORMATS:
            if lo or hi is not None:
                raise self.fail(path, f"minLength/maxLength with format {fmt!r} is not supported")
            return self.prim(_FORMATS[fmt])
        if lo == 0 and hi is None:
            return self.prim("string")
        if lo > _MAX_REPEAT:
            raise self.fail(path, f"minLength {lo} is too large (at most {_MAX_REPEAT})")
        if hi is not None and hi > _MAX_REPEAT:
            hi = None
        self.prim("char")
        self.prim("ws")
        count = f"{{{lo}}}" if hi == lo else f"{{{lo},}}" if hi is None else f"{{{lo},{hi}}}"
        return self.new_rule(hint, f'"\\"" char{count} "\\"" ws')

    def _bounds(self, schema: Mapping[str, Any], path: str) -> tuple[float | None, bool, float | None, bool]:
        values: dict[str, Any] = {}
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            v = schema.get(key)
            if v is None:
                continue
            if isinstance(v, bool) and key.startswith("exclusive"):
                values[key] = v
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise self.fail(path, f"{key} must be a number, got {v!r}")
            values[key] = v
        lo: float | None = values.get("minimum")
        hi: float | None = values.get("maximum")
        assert not isinstance(lo, bool) and not isinstance(hi, bool)
        lo_excl = hi_excl = False
        ex_lo, ex_hi = values.get("exclusiveMinimum"), values.get("exclusiveMaximum")
        if ex_lo is True:
            lo_excl = lo is not None
        elif ex_lo is not None and ex_lo is not False and (lo is None or ex_lo >= lo):
            lo, lo_excl = ex_lo, True
        if ex_hi is True:
            hi_excl = hi is not None
        elif ex_hi is not None and ex_hi is not False and (hi is None or ex_hi <= hi):
            hi, hi_excl = ex_hi, True
        return lo, lo_excl, hi, hi_excl

    def visit_integer(self, schema: Mapping[str, Any], path: str, hint: str) -> str:
        lo_f, lo_excl, hi_f, hi_excl = self._bounds(schema, path)
        if lo_f is None and hi_f is None:
            return self.prim("integer")
        lo = None if lo_f is None else (math.floor(lo_f) + 1 if lo_excl else math.ceil(lo_f))
        hi = None if hi_f is None else (math.ceil(hi_f) - 1 if hi_excl else math.floor(hi_f))
        limit = 10**_MAX_DIGITS - 1
        if (lo is not None and lo > limit) or (hi is not None and hi < -limit):
            raise self.fail(path, "integer bounds beyond 16 digits are not supported")
        lo = None if lo is None or lo < -limit else lo
        hi = None if hi is None or hi > limit else hi
        if lo is not None and hi is not None and lo > hi:
            raise self.fail(path, f"no integer lies between the bounds ({lo_f}, {hi_f})")
        self.prim("ws")
        return self.new_rule(hint, _integer_range(lo, hi))

    def visit_number(self, schema: Mapping[str, Any], path: str) -> str:
        lo, lo_excl, hi, _ = self._bounds(schema, path)
        if lo is None and hi is None:
            return self.prim("number")
        if hi is None and lo == 0 and not lo_excl:
            self.prim("integral-part")
            self.prim("decimal-part")
            self.prim("ws")
            name = "nonnegative-number"
            self.rules.setdefault(name, 'integral-part ("." decimal-part)? ([eE] [-+]? integral-part)? ws')
            return name
        if self.strict:
            raise self.fail(path, "bounds on non-integer numbers cannot be enforced (only minimum: 0)")
        return self.prim("number")

    def visit_array(self, schema: Mapping[str, Any], path: str, hint: str) -> str:
        if schema.get("uniqueItems") is True and self.strict:
            raise self.fail(path, "uniqueItems cannot be enforced by a grammar")
        lo = self.check_int(schema, "minItems", path) or 0
        hi = self.check_int(schema, "maxItems", path)
        if hi is not None and hi < lo:
            raise self.fail(path, f"maxItems {hi} is less than minItems {lo}")
        if lo > _MAX_REPEAT:
            raise self.fail(path, f"minItems {lo} is too large (at most {_MAX_REPEAT})")
        if hi is not None and hi > _MAX_REPEAT:
            hi = None
        items = schema.get("items", True)
        prefix = schema.get("prefixItems")
        if isinstance(items, list):  # the draft-04 tuple form
            prefix, items = items, schema.get("additionalItems", True)
        saved, self.unguarded = self.unguarded, set()
        try:
            self.prim("ws")
            if prefix is not None:
                if not isinstance(prefix, list):
                    raise self.fail(path, "prefixItems must be an array")
                parts = [self.visit(s, f"{path}/prefixItems/{i}", f"{hint}-{i}") for i, s in enumerate(prefix)]
                body = ' "," ws '.join(parts)
                if items is not False and items is not None and parts:
                    rest = self.visit(items, f"{path}/items", f"{hint}-item")
                    body += f' ("," ws {rest})*'
                elif not parts and items is not False:
                    rest = self.visit(items, f"{path}/items", f"{hint}-item")
                    body = f'({rest} ("," ws {rest})*)?'
                return self.new_rule(hint, f'"[" ws {body} "]" ws')
            if items is False:
                if lo:
                    raise self.fail(path, "items: false with minItems > 0 matches nothing")
                return self.new_rule(hint, '"[" ws "]" ws')
            item = self.visit(items, f"{path}/items", f"{hint}-item")
        finally:
            self.unguarded = saved
        if hi == 0:
            return self.new_rule(hint, '"[" ws "]" ws')
        if lo == 0:
            more = "*" if hi is None else f"{{0,{hi - 1}}}"
            body = f'({item} ("," ws {item}){more})?'
        else:
            more = f"{{{lo - 1},}}" if hi is None else f"{{{lo - 1}}}" if hi == lo else f"{{{lo - 1},{hi - 1}}}"
            body = f'{item} ("," ws {item}){more}'
        return self.new_rule(hint, f'"[" ws {body} "]" ws')

    def visit_object(self, schema: Mapping[str, Any], path: str, hint: str) -> str:
        if "properties" not in schema and "additionalProperties" not in schema and not schema.get("required"):
            return self.prim("object")
        props = schema.get("properties")
        props = {} if props is None else props
        if not isinstance(props, Mapping):
            raise self.fail(path, "properties must be an object")
        required = schema.get("required") or []
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self.fail(path, "required must be an array of strings")
        additional = schema.get("additionalProperties", False)
        if not isinstance(additional, (bool, Mapping)):
            raise self.fail(path, "additionalProperties must be a boolean or a schema")
        names = list(props)
        for r in required:
            if r not in props:
                if additional is False:
                    raise self.fail(path, f"required property {r!r} is not allowed (no such property)")
                names.append(r)
        saved, self.unguarded = self.unguarded, set()
        try:
            self.prim("ws")
            kvs: list[tuple[str, bool]] = []
            for key in names:
                sub = props.get(key, additional if isinstance(additional, Mapping) else True)
                value = self.visit(sub, f"{path}/properties/{key}", f"{hint}-{key}")
                key_literal = _literal(json.dumps(key, ensure_ascii=False))
                kv = self.new_rule(f"{hint}-{key}-kv", f'{key_literal} ws ":" ws {value}')
                kvs.append((kv, key in required))
            extra_kv = None
            if additional is not False:
                value = self.visit(additional, f"{path}/additionalProperties", f"{hint}-additional")
                key_rule = self.key_not_in(names, f"{hint}-additional-key")
                extra_kv = self.new_rule(f"{hint}-additional-kv", f'{key_rule} ":" ws {value}')
        finally:
            self.unguarded = saved
        # Properties in declared order, the optional ones skippable. tails[i] is what may follow once a
        # member has been written (each part starts with a comma); the head is what may come first.
        n = len(kvs)
        tails = [""] * (n + 1)
        tails[n] = f'("," ws {extra_kv})*' if extra_kv else ""
        for i in range(n - 1, -1, -1):
            kv, is_required = kvs[i]
            part = f'"," ws {kv}' if is_required else f'("," ws {kv})?'
            tails[i] = f"{part} {tails[i + 1]}".strip()
        first_required = next((i for i, (_, req) in enumerate(kvs) if req), n)
        nullable = first_required == n
        if not nullable:
            head = f"{kvs[first_required][0]} {tails[first_required + 1]}".strip()
        else:
            head = f'{extra_kv} ("," ws {extra_kv})*' if extra_kv else ""
        for i in range(first_required - 1, -1, -1):
            option = f"{kvs[i][0]} {tails[i + 1]}".strip()
            head = self.new_rule(f"{hint}-from-{i}", f"{option} | {head}") if head else option
        if nullable and head:
            head = f"({head})?"
        body = f'"{{" ws {head} "}}" ws' if head else '"{" ws "}" ws'
        return self.new_rule(hint, body)

    def key_not_in(self, keys: list[str], hint: str) -> str:
        """A JSON string rule matching any key except the given ones."""
        self.prim("char")
        self.prim("ws")
        if not keys:
            return self.prim("string")
        root = _Trie()
        for key in keys:
            node = root
            for c in json.dumps(key, ensure_ascii=False)[1:-1]:
                node = node.children.setdefault(c, _Trie())
            node.end = True

        def expr(node: _Trie, may_end: bool) -> str:
            alts = [f"[{_class_char(c)}] {expr(child, not child.end)}" for c, child in sorted(node.children.items())]
            excluded = "".join(_class_char(c) for c in sorted(node.children) if c != "\\")
            alts.append(f'[^"\\\\\\x7F\\x00-\\x1F{excluded}] char*')
            if "\\" not in node.children:
                alts.append('[\\\\] (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4}) char*')
            return "(" + " | ".join(alts) + ")" + ("?" if may_end else "")

        return self.new_rule(hint, f'"\\"" {expr(root, not root.end)} "\\"" ws')


def _convert(
    schema: Any, *, strict: bool, prefix: str = "", rules: dict[str, str] | None = None
) -> tuple[str, _Converter]:
    rules = rules if rules is not None else {}
    conv = _Converter(schema, prefix=prefix, rules=rules, strict=strict)
    try:
        expr = conv.visit(schema, "#", prefix + "root" if prefix else "root-value")
    except RecursionError:
        raise InvalidFormat("JSON schema is nested too deeply") from None
    return expr, conv


def _render(root: str, rules: dict[str, str], primitives: set[str]) -> str:
    base = _grammar(root, sorted(primitives))
    head, _, rest = base.partition("\n")
    custom = "".join(f"{k} ::= {v}\n" for k, v in rules.items())
    return head + "\n" + custom + rest


def schema_to_gbnf(schema: Mapping[str, Any] | bool | str, *, strict: bool = True) -> str:
    """A GBNF grammar for JSON documents valid against `schema`.

    With `strict` (the default) anything the grammar cannot enforce raises `InvalidFormat`;
    with `strict=False` such constraints are dropped, as llama.cpp itself does.
    """
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise InvalidFormat("the JSON schema is not valid JSON") from None
    if not isinstance(schema, (Mapping, bool)):
        raise InvalidFormat(f"a JSON schema must be an object, got {type(schema).__name__}")
    expr, conv = _convert(schema, strict=strict)
    return _render(expr, conv.rules, conv.primitives)


def format_to_grammar(fmt: Any) -> str | None:
    """The grammar for a request's `format` (Ollama's field): None, "json", or a JSON schema."""
    if fmt is None or fmt == "" or fmt == "null":
        return None
    if isinstance(fmt, str):
        if fmt.strip() == "json":
            return JSON_GBNF
        text = fmt.strip()
        if text.startswith("{"):
            return schema_to_gbnf(text)
        raise InvalidFormat(f'invalid format {fmt!r}: expected "json" or a JSON schema object')
    if isinstance(fmt, Mapping):
        return schema_to_gbnf(fmt)
    raise InvalidFormat(f'invalid format of type {type(fmt).__name__}: expected "json" or a JSON schema object')


def tool_call_grammar(tools: Sequence[Any], *, strict: bool = False) -> str:
    """A grammar forcing one `{"name": <tool>, "arguments": <its parameters>}` call to one of `tools`."""
    from .tools import tool_function

    rules: dict[str, str] = {}
    primitives: set[str] = {"ws"}
    alts: list[str] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        fn = tool_function(tool)
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidFormat(f"tool {i} has no function name")
        if name in seen:
            continue
        seen.add(name)
        params = fn.get("parameters")
        if params is None or params == {}:
            params = {"type": "object", "properties": {}}
        prefix = f"tool{i}-"
        try:
            expr, conv = _convert(params, strict=strict, prefix=prefix, rules=rules)
        except InvalidFormat as exc:
            raise InvalidFormat(f"tool {name!r} parameters: {exc}") from None
        primitives |= conv.primitives
        name_lit = _literal(json.dumps(name, ensure_ascii=False))
        body = f'"{{" ws "\\"name\\"" ws ":" ws {name_lit} ws "," ws "\\"arguments\\"" ws ":" ws {expr} "}}" ws'
        alts.append(_new_name(rules, f"{prefix}call", body))
    if not alts:
        raise InvalidFormat("tool_call_grammar needs at least one tool")
    return _render(" | ".join(alts), rules, primitives)


def _new_name(rules: dict[str, str], name: str, body: str) -> str:
    base, n = name, 1
    while name in rules:
        n += 1
        name = f"{base}-{n}"
    rules[name] = body
    return name
