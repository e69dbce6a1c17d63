"""Values as Go writes them as text: encoding/json, strconv.Quote and the shortest float form.

Ollama is a Go program. Its templates print values with these encodings and its store hashes blobs
written with them, so matching them byte for byte keeps prompts and digests the same.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import Decimal

__all__ = ["Marshaler", "go_format_float", "go_json", "go_quote"]


# --------------------------------------------------------------------------------------------------------------------
# Floats (strconv.FormatFloat with the shortest precision)


def _shortest_digits(x: float) -> tuple[str, int]:
    """The shortest decimal digits that read back as |x|, and the decimal exponent of the first digit."""
    _, digits, exponent = Decimal(repr(abs(x))).normalize().as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits)) or "0"
    return text, len(text) + exponent - 1


def _exponent_form(digits: str, exponent: int, min_exponent_digits: int = 2) -> str:
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    sign = "-" if exponent < 0 else "+"
    return f"{mantissa}e{sign}{abs(exponent):0{min_exponent_digits}d}"


def _fixed_form(digits: str, exponent: int) -> str:
    if exponent >= 0:
        if len(digits) <= exponent + 1:
            return digits + "0" * (exponent + 1 - len(digits))
        return digits[: exponent + 1] + "." + digits[exponent + 1 :]
    return "0." + "0" * (-exponent - 1) + digits


def go_format_float(x: float) -> str:
    """A float64 as fmt's %v prints it (strconv 'g' with the shortest precision)."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if x == 0:
        return "-0" if math.copysign(1.0, x) < 0 else "0"
    digits, exponent = _shortest_digits(x)
    sign = "-" if x < 0 else ""
    if exponent < -4 or exponent >= 6:
        return sign + _exponent_form(digits, exponent)
    return sign + _fixed_form(digits, exponent)


def _json_float(x: float) -> str:
    if math.isnan(x) or math.isinf(x):
        raise ValueError(f"json: unsupported value: {go_format_float(x)}")
    if x == 0:
        return "-0" if math.copysign(1.0, x) < 0 else "0"
    digits, exponent = _shortest_digits(x)
    sign = "-" if x < 0 else ""
    if abs(x) < 1e-6 or abs(x) >= 1e21:
        return sign + _exponent_form(digits, exponent, 1 if exponent < 0 else 2)
    return sign + _fixed_form(digits, exponent)


# --------------------------------------------------------------------------------------------------------------------
# encoding/json

_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
# Besides quotes and control characters, Go escapes HTML's special characters and the JavaScript line separators.
_JSON_NEEDS_ESCAPE = re.compile('["\\\\\x00-\x1f<>&\u2028\u2029]')


def _json_escape(match: re.Match[str]) -> str:
    char = match.group(0)
    return _JSON_ESCAPES.get(char) or f"\\u{ord(char):04x}"


def _json_string(text: str) -> str:
    return '"' + _JSON_NEEDS_ESCAPE.sub(_json_escape, text) + '"'


class Marshaler:
    """A value that writes its own JSON, as a Go type with a MarshalJSON method does.

    A plain base class rather than an ABC: values of template types are checked with isinstance
    at every step of a render, and ABC checks cost several times more.
    """

    __slots__ = ()

    def marshal_json(self) -> str:
        """The value as JSON text."""
        raise NotImplementedError


def go_json(value: object, *, sort_keys: bool = True) -> str:
    """A value as Go's json.Marshal writes it: compact, HTML-safe escaping, Go's number forms.

    Mappings are Go maps, their keys sorted; with `sort_keys=False` every mapping is a Go struct
    instead, its fields in insertion order. Other values are written as their `str`.
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**21 else _json_float(float(value))
    if isinstance(value, float):
        return _json_float(value)
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, Marshaler):
        return value.marshal_json()
    if isinstance(value, Mapping):
        keys = sorted(value, key=str) if sort_keys else list(value)
        return "{" + ",".join(_json_string(str(k)) + ":" + go_json(value[k], sort_keys=sort_keys) for k in keys) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(go_json(v, sort_keys=sort_keys) for v in value) + "]"
    return _json_string(str(value))


# --------------------------------------------------------------------------------------------------------------------
# strconv.Quote

_QUOTE_ESCAPES = {
    '"': '\\"', "\\": "\\\\", "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v",
}  # fmt: skip


def go_quote(text: str) -> str:
    """A string as strconv.Quote writes it (and so fmt's %q and %#v): Go escapes for what is not printable."""
    out = ['"']
    for char in text:
        if char in _QUOTE_ESCAPES:
            out.append(_QUOTE_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        elif ord(char) < 0x80:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) <= 0xFFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    out.append('"')
    return "".join(out)
