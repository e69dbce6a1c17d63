"""The functions templates can call: Go's builtins (printf among them) and Ollama's own.

Each function takes its evaluated arguments as a list and raises `FuncError` for what Go reports
as an error calling it.
"""

from __future__ import annotations

import datetime as _dt
import re
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from ...gojson import go_format_float, go_json, go_quote
from ..limits import current_budget
from .values import GoList, GoStruct, go_fmt, go_kind, go_type, stringer, truth

__all__ = ["BUILTIN_NAMES", "FuncError", "arity_problem", "builtin"]


# --------------------------------------------------------------------------------------------------------------------
# printf (the verbs templates use)

_VERB = re.compile(r"%([-+# 0]*)(\d+|\*)?(?:\.(\d+|\*)?)?([a-zA-Z%])")


def _go_sprintf(fmt: str, args: list[Any]) -> str:
    out: list[str] = []
    argi = 0
    pos = 0
    for m in _VERB.finditer(fmt):
        out.append(fmt[pos : m.start()])
        pos = m.end()
        flags, width, prec, verb = m.group(1), m.group(2), m.group(3), m.group(4)
        if verb == "%":
            out.append("%")
            continue
        if width == "*":
            width = str(args[argi]) if argi < len(args) and isinstance(args[argi], int) else None
            argi += 1
        if prec == "*":
            prec = str(args[argi]) if argi < len(args) and isinstance(args[argi], int) else None
            argi += 1
        for size in (width, prec):
            if size:  # refused before formatting: a width alone can ask for gigabytes
                current_budget().check_size(abs(int(size)))
        if argi >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        arg = args[argi]
        argi += 1
        text = _format_verb(verb, flags, prec, arg)
        if width:
            w = int(width)
            if "-" in flags:
                text = text.ljust(w)
            elif "0" in flags and verb in "dfeEgGxX" and not isinstance(arg, str):
                sign = text[0] if text[:1] in "+-" else ""
                text = sign + text[len(sign) :].rjust(w - len(sign), "0")
            else:
                text = text.rjust(w)
        out.append(text)
    out.append(fmt[pos:])
    if argi < len(args):
        extra = ", ".join(f"{go_type(a)}={go_fmt(a)}" for a in args[argi:])
        out.append(f"%!(EXTRA {extra})")
    return "".join(out)


def _format_verb(verb: str, flags: str, prec: str | None, arg: Any) -> str:
    bad = f"%!{verb}({go_type(arg)}={go_fmt(arg)})"
    if verb in "vs":
        if verb == "s" and isinstance(arg, (bool, int, float)) and stringer(arg) is None:
            return bad
        text = go_fmt(arg)
        return text[: int(prec)] if prec is not None and verb == "s" else text
    if verb == "q":
        return go_quote(go_fmt(arg)) if isinstance(arg, str) or stringer(arg) else bad
    if verb == "t":
        return ("true" if arg else "false") if isinstance(arg, bool) else bad
    if verb == "d":
        if isinstance(arg, int) and not isinstance(arg, bool):
            return ("+" if "+" in flags and arg >= 0 else "") + str(arg)
        return bad
    if verb in "xX":
        if isinstance(arg, int) and not isinstance(arg, bool):
            text = format(arg, "x")
        elif isinstance(arg, str):
            text = arg.encode().hex()
        else:
            return bad
        return text.upper() if verb == "X" else text
    if verb == "c":
        return chr(arg) if isinstance(arg, int) and not isinstance(arg, bool) and 0 <= arg <= 0x10FFFF else bad
    if verb in "feEgG":
        if not isinstance(arg, float):
            return bad
        p = int(prec) if prec is not None else (6 if verb in "feE" else None)
        if verb in "gG" and p is None:
            return go_format_float(arg)
        return format(arg, f".{p}{verb}")
    return bad


# --------------------------------------------------------------------------------------------------------------------
# Builtins


class FuncError(Exception):
    """What Go reports as an error calling a template function."""


def _eq(a: Any, b: Any) -> bool:
    ka, kb = go_kind(a), go_kind(b)
    if ka != kb:
        if ka == "invalid" or kb == "invalid":
            return False
        raise FuncError("incompatible types for comparison")
    if ka == "invalid":
        return True
    if ka != "other":
        return bool(a == b)
    if isinstance(a, (list, tuple, Mapping)) or isinstance(b, (list, tuple, Mapping)):
        raise FuncError(f"non-comparable types {go_type(a)} and {go_type(b)}")
    return a is b


def _fn_eq(args: list[Any]) -> bool:
    if len(args) < 2:
        raise FuncError("missing argument for comparison")
    return any(_eq(args[0], b) for b in args[1:])


def _lt(a: Any, b: Any) -> bool:
    ka, kb = go_kind(a), go_kind(b)
    if ka not in ("int", "float", "string") or kb not in ("int", "float", "string"):
        raise FuncError("invalid type for comparison")
    if ka != kb:
        raise FuncError("incompatible types for comparison")
    return bool(a < b)


def _fn_len(args: list[Any]) -> int:
    item = args[0]
    if item is None:
        raise FuncError("len of nil pointer")
    if isinstance(item, str):
        return len(item.encode("utf-8"))
    if isinstance(item, (list, tuple, Mapping)):
        return len(item)
    raise FuncError(f"len of type {go_type(item)}")


def _index_arg(index: Any, cap: int) -> int:
    if not isinstance(index, int) or isinstance(index, bool):
        raise FuncError(f"cannot index slice/array with type {go_type(index)}")
    if index < 0 or index >= cap:
        raise FuncError(f"index out of range: {index}")
    return index


def _fn_index(args: list[Any]) -> Any:
    item = args[0]
    for index in args[1:]:
        if item is None:
            raise FuncError("index of untyped nil")
        if isinstance(item, str):
            raw = item.encode("utf-8")
            item = raw[_index_arg(index, len(raw))]
        elif isinstance(item, (list, tuple)):
            item = item[_index_arg(index, len(item))]
        elif isinstance(item, Mapping):
            item = item.get(index)
        else:
            raise FuncError(f"can't index item of type {go_type(item)}")
    return item


def _fn_slice(args: list[Any]) -> Any:
    item, idx = args[0], args[1:]
    if item is None:
        raise FuncError("slice of untyped nil")
    if len(idx) > 3:
        raise FuncError(f"too many slice indexes: {len(idx)}")
    if isinstance(item, str):
        if len(idx) == 3:
            raise FuncError("cannot 3-index slice a string")
        seq: Any = item.encode("utf-8")
    elif isinstance(item, (list, tuple)):
        seq = item
    else:
        raise FuncError(f"can't slice item of type {go_type(item)}")
    cap = len(seq)
    bounds = [0, cap]
    for i, x in enumerate(idx[:2]):
        if not isinstance(x, int) or isinstance(x, bool):
            raise FuncError(f"cannot index slice/array with type {go_type(x)}")
        if x < 0 or x > cap:
            raise FuncError(f"index out of range: {x}")
        bounds[i] = x
    if len(idx) == 3:
        third = idx[2]
        if not isinstance(third, int) or third < bounds[1] or third > cap:
            raise FuncError(f"index out of range: {third}")
    if bounds[0] > bounds[1]:
        raise FuncError(f"invalid slice index: {bounds[0]} > {bounds[1]}")
    part = seq[bounds[0] : bounds[1]]
    if isinstance(part, bytes):
        return part.decode("utf-8", errors="replace")
    return type(item)(part) if isinstance(item, GoList) else list(part)


def _sprint(args: list[Any]) -> str:
    out: list[str] = []
    prev_string = False
    for i, a in enumerate(args):
        is_string = isinstance(a, str)
        if i > 0 and not is_string and not prev_string:
            out.append(" ")
        out.append(go_fmt(a))
        prev_string = is_string
    return "".join(out)


def _fn_printf(args: list[Any]) -> str:
    if not isinstance(args[0], str):
        raise FuncError(f"wrong type for value; expected string; got {go_type(args[0])}")
    return _go_sprintf(args[0], args[1:])


def _escaper_arg(args: list[Any]) -> str:
    if len(args) == 1 and isinstance(args[0], str):
        return args[0]
    return _sprint(args)


def _html_escape(s: str) -> str:
    table = {'"': "&#34;", "'": "&#39;", "&": "&amp;", "<": "&lt;", ">": "&gt;", "\x00": "\ufffd"}
    return "".join(table.get(c, c) for c in s)


def _js_escape(s: str) -> str:
    table = {"\\": "\\\\", "'": "\\'", '"': '\\"', "<": "\\u003C", ">": "\\u003E", "&": "\\u0026", "=": "\\u003D"}
    out = []
    for c in s:
        if c in table:
            out.append(table[c])
        elif ord(c) < 0x20 or not c.isprintable():
            out.append(f"\\u{ord(c):04X}")
        else:
            out.append(c)
    return "".join(out)


def _fn_date(offset_days: int) -> Callable[[list[Any]], str]:
    def fn(args: list[Any]) -> str:
        for a in args:
            if not isinstance(a, str):
                raise FuncError(f"wrong type for value; expected string; got {go_type(a)}")
        return (_dt.date.today() + _dt.timedelta(days=offset_days)).isoformat()

    return fn


def _fn_typescript(args: list[Any]) -> str:
    value = args[0]
    if isinstance(value, GoStruct) and "ToTypeScriptType" in value.methods:
        return str(value.methods["ToTypeScriptType"]())
    return "any"


def _fn_call(args: list[Any]) -> Any:
    raise FuncError("call is not supported in chat templates")


_FUNCS: dict[str, Callable[[list[Any]], Any]] = {
    "not": lambda a: not truth(a[0]),
    "len": _fn_len,
    "index": _fn_index,
    "slice": _fn_slice,
    "print": _sprint,
    "println": lambda a: " ".join(go_fmt(x) for x in a) + "\n",
    "printf": _fn_printf,
    "eq": _fn_eq,
    "ne": lambda a: not _fn_eq(a),
    "lt": lambda a: _lt(a[0], a[1]),
    "le": lambda a: _lt(a[0], a[1]) or _eq(a[0], a[1]),
    "gt": lambda a: not (_lt(a[0], a[1]) or _eq(a[0], a[1])),
    "ge": lambda a: not _lt(a[0], a[1]),
    "html": lambda a: _html_escape(_escaper_arg(a)),
    "js": lambda a: _js_escape(_escaper_arg(a)),
    "urlquery": lambda a: urllib.parse.quote_plus(_escaper_arg(a), safe=""),
    "json": lambda a: go_json(a[0]),
    "currentDate": _fn_date(0),
    "yesterdayDate": _fn_date(-1),
    "toTypeScriptType": _fn_typescript,
    "call": _fn_call,
}

_ARITY: dict[str, tuple[int, int | None]] = {
    "not": (1, 1),
    "len": (1, 1),
    "index": (1, None),
    "slice": (1, None),
    "printf": (1, None),
    "eq": (1, None),
    "ne": (2, 2),
    "lt": (2, 2),
    "le": (2, 2),
    "gt": (2, 2),
    "ge": (2, 2),
    "json": (1, 1),
    "toTypeScriptType": (1, 1),
}

#: Every name a template may call; `and` and `or` are evaluated by the executor, lazily, as in Go.
BUILTIN_NAMES = frozenset({"and", "or", *_FUNCS})


def builtin(name: str) -> Callable[[list[Any]], Any] | None:
    """The function a template calls by `name`; None for `and`/`or` and names that are not functions."""
    return _FUNCS.get(name)


def arity_problem(name: str, count: int) -> str | None:
    """Go's complaint about calling `name` with `count` arguments, or None when the count is right."""
    arity = _ARITY.get(name)
    if arity is None:
        return None
    least, most = arity
    if least <= count and (most is None or count <= most):
        return None
    want = str(least) if most == least else f"at least {least}" if most is None else f"{least} to {most}"
    return f"wrong number of args for {name}: want {want} got {count}"
