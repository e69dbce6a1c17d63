"""The lexer of Go's text/template: template text into text items and the tokens of each action.

Positions are character offsets; `Source` turns them into the `line:column` Go's errors name.
"""

from __future__ import annotations

import math
import re
from typing import Any

import attrs

from ...errors import TemplateError

__all__ = ["KEYWORDS", "GoTemplateError", "Item", "Source", "Token", "scan"]

_SPACE = " \t\r\n"
KEYWORDS = {"block", "break", "continue", "define", "else", "end", "if", "range", "template", "with"}


class GoTemplateError(TemplateError):
    """A Go template failed to parse or execute."""


class Source:
    """Template text, and the `line:column` of an offset in it for error messages."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._line_starts = [0]
        for m in re.finditer("\n", text):
            self._line_starts.append(m.end())

    def where(self, pos: int) -> str:
        lo, hi = 0, len(self._line_starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._line_starts[mid] <= pos:
                lo = mid
            else:
                hi = mid - 1
        return f"{lo + 1}:{pos - self._line_starts[lo] + 1}"

    def error(self, pos: int, message: str) -> GoTemplateError:
        return GoTemplateError(f"template: {self.where(pos)}: {message}")


@attrs.frozen
class Token:
    """One token of an action; `spaced` says whether space came before it (Go's operand rules need it)."""

    kind: str  # field var ident string number bool nil dot ( ) | , := =
    value: Any
    pos: int
    spaced: bool


_NUMBER = re.compile(
    r"[+-]?(?:0[xX][0-9a-fA-F_]+(?:\.[0-9a-fA-F_]*)?(?:[pP][+-]?\d+)?|0[bB][01_]+|0[oO][0-7_]+"
    r"|(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?)i?"
)
_WORD = re.compile(r"\w+")
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"', "'": "'"}


def _unquote(src: Source, body: str, pos: int, quote: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        if i + 1 >= len(body):
            raise src.error(pos, "bad escape in quoted string")
        e = body[i + 1]
        if e in _ESCAPES:
            if (e == "'" and quote == '"') or (e == '"' and quote == "'"):
                raise src.error(pos, f"invalid escape \\{e} in quoted string")
            out.append(_ESCAPES[e])
            i += 2
        elif e in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[e]
            digits = body[i + 2 : i + 2 + width]
            if len(digits) != width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise src.error(pos, "bad escape in quoted string")
            code = int(digits, 16)
            if code > 0x10FFFF:
                raise src.error(pos, "bad escape in quoted string")
            out.append(chr(code))
            i += 2 + width
        elif e in "01234567":
            digits = body[i + 1 : i + 4]
            if len(digits) != 3 or not all(d in "01234567" for d in digits) or int(digits, 8) > 255:
                raise src.error(pos, "bad escape in quoted string")
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            raise src.error(pos, f"unknown escape \\{e} in quoted string")
    return "".join(out)


def _parse_number(src: Source, text: str, pos: int) -> int | float:
    t = text.replace("_", "")
    if t.endswith("i"):
        raise src.error(pos, f"complex constants are not supported: {text}")
    sign = 1
    body = t
    if body[:1] in "+-":
        sign = -1 if body[0] == "-" else 1
        body = body[1:]
    try:
        low = body.lower()
        if low.startswith("0x"):
            if "." in low or "p" in low:
                return sign * float.fromhex(body)
            number = int(body, 16)
        elif low.startswith("0b"):
            number = int(body[2:], 2)
        elif low.startswith("0o"):
            number = int(body[2:], 8)
        elif any(c in low for c in ".e"):
            return sign * float(body)
        elif len(body) > 1 and body.startswith("0"):
            number = int(body, 8)
        else:
            number = int(body)
        if number >= 1 << 64:  # Go keeps integers in 64 bits; a longer decimal constant is a float
            as_float = float(body) if body.isdigit() else math.inf
            if math.isinf(as_float):
                raise ValueError(text)
            return sign * as_float
        return sign * number
    except ValueError:
        raise src.error(pos, f"bad number syntax: {text!r}") from None


def _is_terminator(text: str, i: int) -> bool:
    if i >= len(text):
        return True
    c = text[i]
    return c in _SPACE or c in ".,|:()" or text.startswith("}}", i)


def _lex_action(src: Source, i: int) -> tuple[list[Token], int, bool]:
    """Tokens of one action starting at `i` (after the left delimiter); returns (tokens, end, trim_right)."""
    text = src.text
    n = len(text)
    toks: list[Token] = []
    spaced = True
    depth = 0
    while True:
        if i >= n:
            raise src.error(i, "unclosed action")
        c = text[i]
        if c in _SPACE:
            if text.startswith("-}}", i + 1):
                if depth:
                    raise src.error(i, "unclosed left paren")
                return toks, i + 4, True
            i += 1
            spaced = True
            continue
        if text.startswith("}}", i):
            if depth:
                raise src.error(i, "unclosed left paren")
            return toks, i + 2, False
        start = i
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                if text[j] == "\n":
                    raise src.error(i, "unterminated quoted string")
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                raise src.error(i, "unterminated quoted string")
            toks.append(Token("string", _unquote(src, text[i + 1 : j], i, '"'), start, spaced))
            i = j + 1
        elif c == "`":
            j = text.find("`", i + 1)
            if j < 0:
                raise src.error(i, "unterminated raw quoted string")
            toks.append(Token("string", text[i + 1 : j].replace("\r", ""), start, spaced))
            i = j + 1
        elif c == "'":
            j = i + 1
            while j < n and text[j] != "'":
                if text[j] == "\n":
                    raise src.error(i, "unterminated character constant")
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                raise src.error(i, "unterminated character constant")
            value = _unquote(src, text[i + 1 : j], i, "'")
            if len(value) != 1:
                raise src.error(i, f"malformed character constant: {text[i : j + 1]}")
            toks.append(Token("number", ord(value), start, spaced))
            i = j + 1
        elif c == "$":
            m = _WORD.match(text, i + 1)
            name = "$" + (m.group(0) if m else "")
            i += len(name)
            if not _is_terminator(text, i):
                raise src.error(i, f"bad character {text[i]!r}")
            toks.append(Token("var", name, start, spaced))
        elif c == "." and not (i + 1 < n and text[i + 1].isdigit()):
            m = _WORD.match(text, i + 1)
            if m is None:
                if not _is_terminator(text, i + 1):
                    raise src.error(i + 1, f"bad character {text[i + 1]!r}")
                toks.append(Token("dot", None, start, spaced))
                i += 1
            else:
                i = m.end()
                if not _is_terminator(text, i):
                    raise src.error(i, f"bad character {text[i]!r}")
                toks.append(Token("field", m.group(0), start, spaced))
        elif c.isdigit() or c in "+-.":
            m = _NUMBER.match(text, i)
            if m is None or m.end() == i or m.group(0) in "+-":
                raise src.error(i, f"bad number syntax: {text[i : i + 10]!r}")
            i = m.end()
            if i < n and (text[i].isalnum() or text[i] == "_"):
                raise src.error(start, f"bad number syntax: {text[start : i + 1]!r}")
            toks.append(Token("number", _parse_number(src, m.group(0), start), start, spaced))
        elif c.isalpha() or c == "_":
            m = _WORD.match(text, i)
            assert m is not None
            word = m.group(0)
            i = m.end()
            if not _is_terminator(text, i):
                raise src.error(i, f"bad character {text[i]!r}")
            if word in ("true", "false"):
                toks.append(Token("bool", word == "true", start, spaced))
            elif word == "nil":
                toks.append(Token("nil", None, start, spaced))
            else:
                toks.append(Token("ident", word, start, spaced))
        elif c == "(":
            depth += 1
            toks.append(Token("(", None, start, spaced))
            i += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise src.error(i, "unexpected right paren")
            toks.append(Token(")", None, start, spaced))
            i += 1
        elif c == "|":
            toks.append(Token("|", None, start, spaced))
            i += 1
        elif c == ",":
            toks.append(Token(",", None, start, spaced))
            i += 1
        elif text.startswith(":=", i):
            toks.append(Token(":=", None, start, spaced))
            i += 2
        elif c == "=":
            toks.append(Token("=", None, start, spaced))
            i += 1
        else:
            raise src.error(i, f"bad character {c!r}")
        spaced = False


@attrs.frozen
class Item:
    """A run of text, or one action and its tokens; comments and trimmed space leave no item."""

    kind: str  # "text" or "action"
    pos: int
    text: str = ""
    toks: tuple[Token, ...] = ()


def scan(src: Source) -> list[Item]:
    """The items of template text, with `{{-`/`-}}` trimming applied to the text around them."""
    text = src.text
    n = len(text)
    items: list[Item] = []
    i = 0
    trim_next = False
    while True:
        j = text.find("{{", i)
        end = j if j >= 0 else n
        start = i
        if trim_next:
            while start < end and text[start] in _SPACE:
                start += 1
        left_trim = j >= 0 and j + 3 < n and text[j + 2] == "-" and text[j + 3] in _SPACE
        stop = end
        if left_trim:
            while stop > start and text[stop - 1] in _SPACE:
                stop -= 1
        if stop > start:
            items.append(Item("text", start, text=text[start:stop]))
        if j < 0:
            return items
        k = j + 2 + (2 if left_trim else 0)
        if text.startswith("/*", k):
            close = text.find("*/", k + 2)
            if close < 0:
                raise src.error(j, "unclosed comment")
            after = close + 2
            if text.startswith("}}", after):
                i, trim_next = after + 2, False
            elif after + 1 < n and text[after] in _SPACE and text.startswith("-}}", after + 1):
                i, trim_next = after + 4, True
            else:
                raise src.error(j, "comment ends before closing delimiter")
            continue
        toks, i, trim_next = _lex_action(src, k)
        items.append(Item("action", j, toks=tuple(toks)))
