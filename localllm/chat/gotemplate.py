"""Ollama's Go text/template chat templates, parsed and rendered in Python.

A model created by Ollama (or from a Modelfile with a TEMPLATE) carries a Go
`text/template`. This module implements the part of that language the
templates use — text and actions, `{{- -}}` trimming, comments, pipelines,
variables (`$`, `$x :=`, `$x =`, `range $i, $m :=`), `if`/`else if`/`else`,
`range` (with `break`/`continue`), `with`/`else with`, `define`/`template`/
`block`, field access, and the builtin functions plus Ollama's own
(`json`, `currentDate`, `yesterdayDate`, `toTypeScriptType`) — and renders it
the way Ollama's `template.Execute` does:

* templates that reference `.Messages` get the whole conversation once, with
  `.System` (every system message joined by a blank line), `.Tools` and an
  empty `.Response`; consecutive messages of the same role (tool messages
  excepted) are merged first;
* legacy templates (`.System`/`.Prompt`/`.Response`) are executed once per
  (system, prompt, response) turn and the renderings concatenated; the last
  turn is cut right after `{{ .Response }}` so the prompt ends where the
  model's answer begins.

Templates are untrusted input: every failure is a `TemplateError` naming the
line and column, execution runs under `TemplateLimits` (time, steps, output)
and a depth limit, and nothing reaches the host beyond the values passed in.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from decimal import Decimal
from typing import Any

import attrs

from ..errors import TemplateError
from .template import ChatTemplate, RenderBudget, TemplateLimits, current_budget, render_budget

__all__ = ["GoTemplate", "GoTemplateError", "parse_go_template"]

MAX_TEMPLATE_DEPTH = 64
MAX_PARSE_DEPTH = 200

_SPACE = " \t\r\n"
_KEYWORDS = {"block", "break", "continue", "define", "else", "end", "if", "range", "template", "with"}


class GoTemplateError(TemplateError):
    """A Go template failed to parse or execute."""


# --------------------------------------------------------------------------------------------------------------------
# Positions


class _Source:
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


# --------------------------------------------------------------------------------------------------------------------
# Parse tree (shaped like Go's text/template/parse so Ollama's tree heuristics carry over)


class Node:
    __slots__ = ("pos",)

    def __init__(self, pos: int) -> None:
        self.pos = pos


class ListNode(Node):
    __slots__ = ("nodes",)

    def __init__(self, pos: int, nodes: list[Node] | None = None) -> None:
        super().__init__(pos)
        self.nodes: list[Node] = nodes if nodes is not None else []


class TextNode(Node):
    __slots__ = ("text",)

    def __init__(self, pos: int, text: str) -> None:
        super().__init__(pos)
        self.text = text


class FieldNode(Node):
    __slots__ = ("ident",)

    def __init__(self, pos: int, ident: list[str]) -> None:
        super().__init__(pos)
        self.ident = ident


class VariableNode(Node):
    __slots__ = ("ident",)

    def __init__(self, pos: int, ident: list[str]) -> None:
        super().__init__(pos)
        self.ident = ident


class IdentifierNode(Node):
    __slots__ = ("name",)

    def __init__(self, pos: int, name: str) -> None:
        super().__init__(pos)
        self.name = name


class ChainNode(Node):
    __slots__ = ("field", "node")

    def __init__(self, pos: int, node: Node, field: list[str]) -> None:
        super().__init__(pos)
        self.node = node
        self.field = field


class DotNode(Node):
    __slots__ = ()


class NilNode(Node):
    __slots__ = ()


class LiteralNode(Node):
    """A bool, number or string constant."""

    __slots__ = ("value",)

    def __init__(self, pos: int, value: Any) -> None:
        super().__init__(pos)
        self.value = value


class CommandNode(Node):
    __slots__ = ("args",)

    def __init__(self, pos: int, args: list[Node]) -> None:
        super().__init__(pos)
        self.args = args


class PipeNode(Node):
    __slots__ = ("cmds", "decl", "is_assign")

    def __init__(self, pos: int, decl: list[str], is_assign: bool, cmds: list[CommandNode]) -> None:
        super().__init__(pos)
        self.decl = decl
        self.is_assign = is_assign
        self.cmds = cmds


class ActionNode(Node):
    __slots__ = ("pipe",)

    def __init__(self, pos: int, pipe: PipeNode) -> None:
        super().__init__(pos)
        self.pipe = pipe


class BranchNode(Node):
    """The shared shape of if, range and with."""

    __slots__ = ("else_list", "list", "pipe")

    def __init__(self, pos: int, pipe: PipeNode, list_: ListNode, else_list: ListNode | None) -> None:
        super().__init__(pos)
        self.pipe = pipe
        self.list = list_
        self.else_list = else_list


class IfNode(BranchNode):
    __slots__ = ()


class RangeNode(BranchNode):
    __slots__ = ()


class WithNode(BranchNode):
    __slots__ = ()


class BreakNode(Node):
    __slots__ = ()


class ContinueNode(Node):
    __slots__ = ()


class TemplateNode(Node):
    __slots__ = ("name", "pipe")

    def __init__(self, pos: int, name: str, pipe: PipeNode | None) -> None:
        super().__init__(pos)
        self.name = name
        self.pipe = pipe


# --------------------------------------------------------------------------------------------------------------------
# Lexer


@attrs.frozen
class _Tok:
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


def _unquote(src: _Source, body: str, pos: int, quote: str) -> str:
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


def _parse_number(src: _Source, text: str, pos: int) -> int | float:
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


def _lex_action(src: _Source, i: int) -> tuple[list[_Tok], int, bool]:
    """Tokens of one action starting at `i` (after the left delimiter); returns (tokens, end, trim_right)."""
    text = src.text
    n = len(text)
    toks: list[_Tok] = []
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
            toks.append(_Tok("string", _unquote(src, text[i + 1 : j], i, '"'), start, spaced))
            i = j + 1
        elif c == "`":
            j = text.find("`", i + 1)
            if j < 0:
                raise src.error(i, "unterminated raw quoted string")
            toks.append(_Tok("string", text[i + 1 : j].replace("\r", ""), start, spaced))
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
            toks.append(_Tok("number", ord(value), start, spaced))
            i = j + 1
        elif c == "$":
            m = _WORD.match(text, i + 1)
            name = "$" + (m.group(0) if m else "")
            i += len(name)
            if not _is_terminator(text, i):
                raise src.error(i, f"bad character {text[i]!r}")
            toks.append(_Tok("var", name, start, spaced))
        elif c == "." and not (i + 1 < n and text[i + 1].isdigit()):
            m = _WORD.match(text, i + 1)
            if m is None:
                if not _is_terminator(text, i + 1):
                    raise src.error(i + 1, f"bad character {text[i + 1]!r}")
                toks.append(_Tok("dot", None, start, spaced))
                i += 1
            else:
                i = m.end()
                if not _is_terminator(text, i):
                    raise src.error(i, f"bad character {text[i]!r}")
                toks.append(_Tok("field", m.group(0), start, spaced))
        elif c.isdigit() or c in "+-.":
            m = _NUMBER.match(text, i)
            if m is None or m.end() == i or m.group(0) in "+-":
                raise src.error(i, f"bad number syntax: {text[i : i + 10]!r}")
            i = m.end()
            if i < n and (text[i].isalnum() or text[i] == "_"):
                raise src.error(start, f"bad number syntax: {text[start : i + 1]!r}")
            toks.append(_Tok("number", _parse_number(src, m.group(0), start), start, spaced))
        elif c.isalpha() or c == "_":
            m = _WORD.match(text, i)
            assert m is not None
            word = m.group(0)
            i = m.end()
            if not _is_terminator(text, i):
                raise src.error(i, f"bad character {text[i]!r}")
            if word in ("true", "false"):
                toks.append(_Tok("bool", word == "true", start, spaced))
            elif word == "nil":
                toks.append(_Tok("nil", None, start, spaced))
            else:
                toks.append(_Tok("ident", word, start, spaced))
        elif c == "(":
            depth += 1
            toks.append(_Tok("(", None, start, spaced))
            i += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise src.error(i, "unexpected right paren")
            toks.append(_Tok(")", None, start, spaced))
            i += 1
        elif c == "|":
            toks.append(_Tok("|", None, start, spaced))
            i += 1
        elif c == ",":
            toks.append(_Tok(",", None, start, spaced))
            i += 1
        elif text.startswith(":=", i):
            toks.append(_Tok(":=", None, start, spaced))
            i += 2
        elif c == "=":
            toks.append(_Tok("=", None, start, spaced))
            i += 1
        else:
            raise src.error(i, f"bad character {c!r}")
        spaced = False


@attrs.frozen
class _Item:
    kind: str  # "text" or "action"
    pos: int
    text: str = ""
    toks: tuple[_Tok, ...] = ()


def _scan(src: _Source) -> list[_Item]:
    text = src.text
    n = len(text)
    items: list[_Item] = []
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
            items.append(_Item("text", start, text=text[start:stop]))
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
        items.append(_Item("action", j, toks=tuple(toks)))


# --------------------------------------------------------------------------------------------------------------------
# Parser

_BUILTINS = {
    "and", "or", "not", "len", "index", "slice", "print", "printf", "println", "eq", "ne", "lt", "le", "gt", "ge",
    "html", "js", "urlquery", "call", "json", "currentDate", "yesterdayDate", "toTypeScriptType",
}  # fmt: skip


class _Parser:
    def __init__(self, src: _Source) -> None:
        self.src = src
        self.items = _scan(src)
        self.i = 0
        self.vars: list[str] = ["$"]
        self.range_depth = 0
        self.depth = 0
        self.defines: dict[str, ListNode] = {}

    def parse(self) -> ListNode:
        root, term, item = self.parse_list(top=True)
        if term is not None:
            assert item is not None
            raise self.src.error(item.pos, f"unexpected {{{{{term}}}}}")
        return root

    # lists ----------------------------------------------------------------------------------------------------

    def parse_list(self, *, top: bool = False) -> tuple[ListNode, str | None, _Item | None]:
        """Nodes up to (and consuming) an `end` or `else` action, or to EOF; returns (list, terminator, its item)."""
        self.depth += 1
        if self.depth > MAX_PARSE_DEPTH:
            raise self.src.error(self.items[self.i - 1].pos if self.i else 0, "template nested too deeply")
        try:
            pos = self.items[self.i].pos if self.i < len(self.items) else len(self.src.text)
            lst = ListNode(pos)
            while self.i < len(self.items):
                item = self.items[self.i]
                self.i += 1
                if item.kind == "text":
                    lst.nodes.append(TextNode(item.pos, item.text))
                    continue
                toks = list(item.toks)
                if not toks:
                    raise self.src.error(item.pos, "missing value for command")
                head = toks[0]
                word = head.value if head.kind == "ident" else None
                if word in ("end", "else"):
                    return lst, word, item
                if word in ("if", "range", "with"):
                    lst.nodes.append(self.parse_control(word, item, toks[1:]))
                elif word == "define":
                    if not top:
                        raise self.src.error(item.pos, "unexpected define: define is only allowed at top level")
                    self.parse_define(item, toks[1:])
                elif word == "block":
                    lst.nodes.append(self.parse_block(item, toks[1:]))
                elif word == "template":
                    lst.nodes.append(self.parse_template(item, toks[1:]))
                elif word in ("break", "continue"):
                    if len(toks) > 1:
                        raise self.src.error(toks[1].pos, f"unexpected {self.describe(toks[1])} in {{{{{word}}}}}")
                    if not self.range_depth:
                        raise self.src.error(item.pos, f"{{{{{word}}}}} outside {{{{range}}}}")
                    lst.nodes.append(BreakNode(item.pos) if word == "break" else ContinueNode(item.pos))
                else:
                    lst.nodes.append(ActionNode(item.pos, self.parse_pipeline(toks, "command", item.pos)))
            return lst, None, None
        finally:
            self.depth -= 1

    def parse_control(self, kind: str, item: _Item, toks: list[_Tok]) -> BranchNode:
        mark = len(self.vars)
        try:
            pipe = self.parse_pipeline(toks, kind, item.pos)
            if kind == "range":
                self.range_depth += 1
            try:
                body, term, term_item = self.parse_list()
            finally:
                if kind == "range":
                    self.range_depth -= 1
            if term is None:
                raise self.src.error(item.pos, f"unexpected EOF: {{{{{kind}}}}} without {{{{end}}}}")
            assert term_item is not None
            else_list: ListNode | None = None
            rest = list(term_item.toks[1:])
            if term == "else":
                if rest and rest[0].kind == "ident" and rest[0].value in ("if", "with"):
                    if rest[0].value != kind:
                        raise self.src.error(rest[0].pos, f"unexpected {rest[0].value!r} in else of {{{{{kind}}}}}")
                    nested = self.parse_control(kind, term_item, rest[1:])
                    else_list = ListNode(term_item.pos, [nested])
                else:
                    if rest:
                        raise self.src.error(rest[0].pos, f"unexpected {self.describe(rest[0])} in else")
                    else_list, term2, term2_item = self.parse_list()
                    if term2 != "end":
                        where = term2_item.pos if term2_item else len(self.src.text)
                        raise self.src.error(where, f"expected end; found {term2 or 'EOF'}")
                    assert term2_item is not None
                    if len(term2_item.toks) > 1:
                        raise self.src.error(term2_item.toks[1].pos, "unexpected token in end")
            elif rest:
                raise self.src.error(rest[0].pos, "unexpected token in end")
            cls = {"if": IfNode, "range": RangeNode, "with": WithNode}[kind]
            return cls(item.pos, pipe, body, else_list)
        finally:
            del self.vars[mark:]

    def parse_define(self, item: _Item, toks: list[_Tok]) -> None:
        if len(toks) != 1 or toks[0].kind != "string":
            raise self.src.error(item.pos, "define needs exactly one template name string")
        saved_vars, self.vars = self.vars, ["$"]
        try:
            body, term, _ = self.parse_list()
        finally:
            self.vars = saved_vars
        if term != "end":
            raise self.src.error(item.pos, "unexpected EOF in define")
        self.defines[toks[0].value] = body

    def parse_block(self, item: _Item, toks: list[_Tok]) -> TemplateNode:
        if not toks or toks[0].kind != "string":
            raise self.src.error(item.pos, "block needs a template name string")
        pipe = self.parse_pipeline(toks[1:], "block", item.pos)
        saved_vars, self.vars = self.vars, ["$"]
        try:
            body, term, _ = self.parse_list()
        finally:
            self.vars = saved_vars
        if term != "end":
            raise self.src.error(item.pos, "unexpected EOF in block")
        self.defines[toks[0].value] = body
        return TemplateNode(item.pos, toks[0].value, pipe)

    def parse_template(self, item: _Item, toks: list[_Tok]) -> TemplateNode:
        if not toks or toks[0].kind != "string":
            raise self.src.error(item.pos, "template needs a template name string")
        pipe = self.parse_pipeline(toks[1:], "template", item.pos) if len(toks) > 1 else None
        return TemplateNode(item.pos, toks[0].value, pipe)

    # pipelines ------------------------------------------------------------------------------------------------

    @staticmethod
    def describe(tok: _Tok) -> str:
        if tok.kind in ("ident", "field", "var"):
            return repr(("." if tok.kind == "field" else "") + str(tok.value))
        if tok.kind in ("string", "number", "bool"):
            return repr(tok.value)
        return repr(tok.kind)

    def parse_pipeline(self, toks: list[_Tok], context: str, pos: int) -> PipeNode:
        decl: list[str] = []
        is_assign = False
        if toks and toks[0].kind == "var":
            if len(toks) > 1 and toks[1].kind in (":=", "="):
                decl, is_assign, toks = [toks[0].value], toks[1].kind == "=", toks[2:]
            elif len(toks) > 1 and toks[1].kind == ",":
                if context != "range":
                    raise self.src.error(toks[1].pos, f"too many declarations in {context}")
                if len(toks) > 3 and toks[2].kind == "var" and toks[3].kind in (":=", "="):
                    decl, is_assign, toks = [toks[0].value, toks[2].value], toks[3].kind == "=", toks[4:]
                else:
                    raise self.src.error(toks[1].pos, "range can only initialize variables")
        for name in decl:
            if is_assign:
                if name not in self.vars:
                    raise self.src.error(pos, f"undefined variable {name!r}")
            elif name == "$":
                raise self.src.error(pos, "cannot declare $")
        cmds = self._commands(toks, context, pos)
        if not is_assign:
            self.vars.extend(decl)
        return PipeNode(pos, decl, is_assign, cmds)

    def _commands(self, toks: list[_Tok], context: str, pos: int) -> list[CommandNode]:
        cmds: list[CommandNode] = []
        idx = 0
        while True:
            if idx >= len(toks) or toks[idx].kind in ("|", ")"):
                raise self.src.error(toks[idx].pos if idx < len(toks) else pos, f"missing value for {context}")
            cmd, idx = self._command(toks, idx)
            cmds.append(cmd)
            if idx >= len(toks):
                break
            if toks[idx].kind == "|":
                idx += 1
                continue
            raise self.src.error(toks[idx].pos, f"unexpected {self.describe(toks[idx])} in {context}")
        for n, cmd in enumerate(cmds[1:], start=2):
            if isinstance(cmd.args[0], (LiteralNode, DotNode, NilNode)):
                raise self.src.error(cmd.pos, f"non executable command in pipeline stage {n}")
        return cmds

    def _command(self, toks: list[_Tok], idx: int) -> tuple[CommandNode, int]:
        args: list[Node] = []
        pos = toks[idx].pos
        while idx < len(toks) and toks[idx].kind not in ("|", ")"):
            if args and not toks[idx].spaced:
                raise self.src.error(toks[idx].pos, f"unexpected {self.describe(toks[idx])} in operand")
            node, idx = self._operand(toks, idx)
            args.append(node)
        return CommandNode(pos, args), idx

    def _operand(self, toks: list[_Tok], idx: int) -> tuple[Node, int]:
        node, idx = self._term(toks, idx)
        if idx < len(toks) and toks[idx].kind == "field" and not toks[idx].spaced:
            fields: list[str] = []
            while idx < len(toks) and toks[idx].kind == "field" and not toks[idx].spaced:
                fields.append(toks[idx].value)
                idx += 1
            if isinstance(node, FieldNode):
                node = FieldNode(node.pos, node.ident + fields)
            elif isinstance(node, VariableNode):
                node = VariableNode(node.pos, node.ident + fields)
            elif isinstance(node, (LiteralNode, DotNode, NilNode)):
                raise self.src.error(node.pos, "unexpected . after term")
            else:
                node = ChainNode(node.pos, node, fields)
        return node, idx

    def _term(self, toks: list[_Tok], idx: int) -> tuple[Node, int]:
        tok = toks[idx]
        kind = tok.kind
        if kind == "ident":
            if tok.value in _KEYWORDS:
                raise self.src.error(tok.pos, f"unexpected {tok.value!r} in operand")
            if tok.value not in _BUILTINS:
                raise self.src.error(tok.pos, f"function {tok.value!r} not defined")
            return IdentifierNode(tok.pos, tok.value), idx + 1
        if kind == "dot":
            return DotNode(tok.pos), idx + 1
        if kind == "nil":
            return NilNode(tok.pos), idx + 1
        if kind == "var":
            if tok.value not in self.vars:
                raise self.src.error(tok.pos, f"undefined variable {tok.value!r}")
            return VariableNode(tok.pos, [tok.value]), idx + 1
        if kind == "field":
            return FieldNode(tok.pos, [tok.value]), idx + 1
        if kind in ("bool", "number", "string"):
            return LiteralNode(tok.pos, tok.value), idx + 1
        if kind == "(":
            depth = 0
            end = idx
            for end in range(idx, len(toks)):
                if toks[end].kind == "(":
                    depth += 1
                elif toks[end].kind == ")":
                    depth -= 1
                    if depth == 0:
                        break
            inner = toks[idx + 1 : end]
            self.depth += 1
            try:
                if self.depth > MAX_PARSE_DEPTH:
                    raise self.src.error(tok.pos, "template nested too deeply")
                pipe = self.parse_pipeline(inner, "parenthesized pipeline", tok.pos)
            finally:
                self.depth -= 1
            return pipe, end + 1
        raise self.src.error(tok.pos, f"unexpected {self.describe(tok)} in operand")


def parse_go_template(source: str) -> tuple[ListNode, dict[str, ListNode]]:
    """Parse Go template text into (root list, defined templates); raises TemplateError."""
    src = _Source(source)
    parser = _Parser(src)
    try:
        root = parser.parse()
    except RecursionError:
        raise GoTemplateError("template: nested too deeply") from None
    return root, parser.defines


# --------------------------------------------------------------------------------------------------------------------
# Go values: structs, stringer maps/lists, fmt and encoding/json formatting


class GoStruct:
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


class GoMap(dict[str, Any]):
    """A Go map: fmt and encoding/json sort its keys; `string` is its String() method, if it has one."""

    string: Callable[[], str] | None = None


class OrderedMap(dict[str, Any]):
    """A map that keeps insertion order when marshalled to JSON (Ollama's ordered maps)."""


class GoList(list[Any]):
    """A Go slice with a String() method."""

    string: Callable[[], str] | None = None


def _stringer(value: Any) -> Callable[[], str] | None:
    if isinstance(value, GoStruct):
        return value.string
    if isinstance(value, (GoMap, GoList)):
        return value.string
    return None


def _go_float_digits(x: float) -> tuple[str, int]:
    """Shortest decimal digits of x and the decimal exponent of the first digit."""
    d = Decimal(repr(abs(x))).normalize()
    _, digits, exp = d.as_tuple()
    assert isinstance(exp, int)
    ds = "".join(map(str, digits)) or "0"
    return ds, len(ds) + exp - 1


def _format_exp(digits: str, exp: int, min_exp_digits: int = 2) -> str:
    mant = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    sign = "-" if exp < 0 else "+"
    return f"{mant}e{sign}{abs(exp):0{min_exp_digits}d}"


def _format_fixed(digits: str, exp: int) -> str:
    if exp >= 0:
        if len(digits) <= exp + 1:
            return digits + "0" * (exp + 1 - len(digits))
        return digits[: exp + 1] + "." + digits[exp + 1 :]
    return "0." + "0" * (-exp - 1) + digits


def go_format_float(x: float) -> str:
    """A float64 as fmt's %v prints it (strconv 'g' with the shortest precision)."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if x == 0:
        return "-0" if math.copysign(1.0, x) < 0 else "0"
    digits, exp = _go_float_digits(x)
    sign = "-" if x < 0 else ""
    if exp < -4 or exp >= 6:
        return sign + _format_exp(digits, exp)
    return sign + _format_fixed(digits, exp)


def _json_float(x: float) -> str:
    if math.isnan(x) or math.isinf(x):
        raise ValueError("unsupported float value")
    if x == 0:
        return "-0" if math.copysign(1.0, x) < 0 else "0"
    digits, exp = _go_float_digits(x)
    sign = "-" if x < 0 else ""
    if abs(x) < 1e-6 or abs(x) >= 1e21:
        return sign + _format_exp(digits, exp, 1 if exp < 0 else 2)
    return sign + _format_fixed(digits, exp)


_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
_JSON_NEEDS_ESCAPE = re.compile('["\\\\\x00-\x1f<>&\u2028\u2029]')


def _json_string(s: str) -> str:
    def repl(m: re.Match[str]) -> str:
        c = m.group(0)
        return _JSON_ESCAPES.get(c) or f"\\u{ord(c):04x}"

    return '"' + _JSON_NEEDS_ESCAPE.sub(repl, s) + '"'


def go_json(value: Any) -> str:
    """Marshal a value as Go's encoding/json does (sorted map keys, HTML-safe escaping, Go number forms)."""
    if isinstance(value, GoStruct):
        if value.json is not None:
            return value.json()
        return "{" + ",".join(_json_string(k) + ":" + go_json(v) for k, v in value.fields.items()) + "}"
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
    if isinstance(value, OrderedMap):
        return "{" + ",".join(_json_string(str(k)) + ":" + go_json(v) for k, v in value.items()) + "}"
    if isinstance(value, Mapping):
        return "{" + ",".join(_json_string(str(k)) + ":" + go_json(value[k]) for k in sorted(value, key=str)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(go_json(v) for v in value) + "]"
    return _json_string(str(value))


def go_fmt(value: Any) -> str:
    """A value as fmt.Sprint prints it."""
    s = _stringer(value)
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


def _go_type(value: Any) -> str:
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


def _truth(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    if isinstance(value, (str, list, tuple, Mapping)):
        return len(value) > 0
    return True


def _kind(value: Any) -> str:
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


# --------------------------------------------------------------------------------------------------------------------
# printf (the verbs templates use)

_VERB = re.compile(r"%([-+# 0]*)(\d+|\*)?(?:\.(\d+|\*)?)?([a-zA-Z%])")


def _go_quote(s: str) -> str:
    out = ['"']
    for c in s:
        if c in _ESCAPES.values() and c != "'":
            out.append("\\" + next(k for k, v in _ESCAPES.items() if v == c and k != "'"))
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


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
        extra = ", ".join(f"{_go_type(a)}={go_fmt(a)}" for a in args[argi:])
        out.append(f"%!(EXTRA {extra})")
    return "".join(out)


def _format_verb(verb: str, flags: str, prec: str | None, arg: Any) -> str:
    bad = f"%!{verb}({_go_type(arg)}={go_fmt(arg)})"
    if verb in "vs":
        if verb == "s" and isinstance(arg, (bool, int, float)) and _stringer(arg) is None:
            return bad
        text = go_fmt(arg)
        return text[: int(prec)] if prec is not None and verb == "s" else text
    if verb == "q":
        return _go_quote(go_fmt(arg)) if isinstance(arg, str) or _stringer(arg) else bad
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
# Execution


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


_MISSING: Any = object()


class _State:
    def __init__(self, src: _Source, defines: dict[str, ListNode], root: Any, budget: RenderBudget) -> None:
        self.src = src
        self.budget = budget
        self.defines = defines
        self.vars: list[list[Any]] = [["$", root]]
        self.out: list[str] = []
        self.depth = 0
        self.node: Node | None = None

    def error(self, message: str, node: Node | None = None) -> GoTemplateError:
        at = node or self.node
        if at is None:
            return GoTemplateError(f"template: {message}")
        return self.src.error(at.pos, f"executing: {message}")

    def write(self, text: str) -> None:
        try:
            self.budget.write(len(text))
        except TemplateError as exc:
            raise self.error(str(exc)) from None
        self.out.append(text)

    def step(self, node: Node) -> None:
        self.node = node
        try:
            self.budget.step()
        except TemplateError as exc:
            raise self.error(str(exc)) from None

    # variables ------------------------------------------------------------------------------------------------

    def var(self, name: str) -> Any:
        for entry in reversed(self.vars):
            if entry[0] == name:
                return entry[1]
        raise self.error(f"undefined variable: {name}")

    def set_var(self, name: str, value: Any) -> None:
        for entry in reversed(self.vars):
            if entry[0] == name:
                entry[1] = value
                return
        raise self.error(f"undefined variable: {name}")

    # walking --------------------------------------------------------------------------------------------------

    def walk(self, dot: Any, node: Node) -> None:
        self.step(node)
        if isinstance(node, ListNode):
            for child in node.nodes:
                self.walk(dot, child)
        elif isinstance(node, TextNode):
            self.write(node.text)
        elif isinstance(node, ActionNode):
            value = self.eval_pipeline(dot, node.pipe)
            if not node.pipe.decl:
                self.node = node
                self.write("<no value>" if value is None else go_fmt(value))
        elif isinstance(node, (IfNode, WithNode)):
            mark = len(self.vars)
            try:
                value = self.eval_pipeline(dot, node.pipe)
                if _truth(value):
                    self.walk(value if isinstance(node, WithNode) else dot, node.list)
                elif node.else_list is not None:
                    self.walk(dot, node.else_list)
            finally:
                del self.vars[mark:]
        elif isinstance(node, RangeNode):
            self.walk_range(dot, node)
        elif isinstance(node, BreakNode):
            raise _Break
        elif isinstance(node, ContinueNode):
            raise _Continue
        elif isinstance(node, TemplateNode):
            self.walk_template(dot, node)
        else:  # pragma: no cover - the parser makes no other nodes
            raise self.error(f"unknown node {type(node).__name__}", node)

    def walk_range(self, dot: Any, node: RangeNode) -> None:
        mark0 = len(self.vars)
        try:
            value = self.eval_pipeline(dot, node.pipe)
            pipe = node.pipe
            if pipe.decl and not pipe.is_assign:
                del self.vars[mark0:]
            mark = len(self.vars)
            items: Iterator[tuple[Any, Any]]
            if value is None:
                items = iter(())
            elif isinstance(value, Mapping):
                keys = list(value) if isinstance(value, OrderedMap) else sorted(value, key=str)
                items = iter([(k, value[k]) for k in keys])
            elif isinstance(value, (list, tuple)):
                items = iter(list(enumerate(value)))
            elif isinstance(value, int) and not isinstance(value, bool):
                if len(pipe.decl) > 1:
                    raise self.error(f"can't use {value} to iterate over more than one variable", node)
                if value > self.budget.limits.max_steps:
                    raise self.error(str(self.budget.limits.exceeded("max_steps", f"ranges over {value:,}")), node)
                items = ((i, i) for i in range(value))
            else:
                raise self.error(f"range can't iterate over {go_fmt(value)}", node)
            ran = False
            for index, elem in items:
                ran = True
                self.step(node)
                if pipe.decl:
                    if pipe.is_assign:
                        if len(pipe.decl) > 1:
                            self.set_var(pipe.decl[0], index)
                            self.set_var(pipe.decl[1], elem)
                        else:
                            self.set_var(pipe.decl[0], elem)
                    elif len(pipe.decl) > 1:
                        self.vars.append([pipe.decl[0], index])
                        self.vars.append([pipe.decl[1], elem])
                    else:
                        self.vars.append([pipe.decl[0], elem])
                try:
                    self.walk(elem, node.list)
                except _Continue:
                    pass
                except _Break:
                    break
                finally:
                    del self.vars[mark:]
            if not ran and node.else_list is not None:
                self.walk(dot, node.else_list)
        finally:
            del self.vars[mark0:]

    def walk_template(self, dot: Any, node: TemplateNode) -> None:
        body = self.defines.get(node.name)
        if body is None:
            raise self.error(f"no such template {node.name!r}", node)
        value = self.eval_pipeline(dot, node.pipe) if node.pipe is not None else None
        if self.depth >= MAX_TEMPLATE_DEPTH:
            raise self.error(f"exceeded maximum template depth ({MAX_TEMPLATE_DEPTH})", node)
        saved, self.vars = self.vars, [["$", value]]
        self.depth += 1
        try:
            self.walk(value, body)
        finally:
            self.depth -= 1
            self.vars = saved

    # evaluation -----------------------------------------------------------------------------------------------

    def eval_pipeline(self, dot: Any, pipe: PipeNode) -> Any:
        self.node = pipe
        value: Any = _MISSING
        for cmd in pipe.cmds:
            value = self.eval_command(dot, cmd, value)
        for name in pipe.decl:
            if pipe.is_assign:
                self.set_var(name, value)
            else:
                self.vars.append([name, value])
        return value

    def not_a_function(self, args: list[Node], final: Any) -> None:
        if len(args) > 1 or final is not _MISSING:
            raise self.error("can't give argument to non-function", args[0])

    def eval_command(self, dot: Any, cmd: CommandNode, final: Any) -> Any:
        first = cmd.args[0]
        self.step(first)
        if isinstance(first, FieldNode):
            return self.eval_fields(dot, dot, first.ident, cmd.args, final, first)
        if isinstance(first, ChainNode):
            if isinstance(first.node, NilNode):
                raise self.error("indirection through explicit nil", first)
            return self.eval_fields(dot, self.eval_arg(dot, first.node), first.field, cmd.args, final, first)
        if isinstance(first, IdentifierNode):
            return self.call(dot, first, cmd.args[1:], final)
        if isinstance(first, PipeNode):
            self.not_a_function(cmd.args, final)
            return self.eval_pipeline(dot, first)
        if isinstance(first, VariableNode):
            value = self.var(first.ident[0])
            if len(first.ident) == 1:
                self.not_a_function(cmd.args, final)
                return value
            return self.eval_fields(dot, value, first.ident[1:], cmd.args, final, first)
        self.not_a_function(cmd.args, final)
        if isinstance(first, LiteralNode):
            return first.value
        if isinstance(first, DotNode):
            return dot
        if isinstance(first, NilNode):
            raise self.error("nil is not a command", first)
        raise self.error(f"can't evaluate command {type(first).__name__}", first)  # pragma: no cover

    def eval_fields(self, dot: Any, receiver: Any, names: list[str], args: list[Node], final: Any, node: Node) -> Any:
        for name in names[:-1]:
            receiver = self.field(receiver, name, node)
        has_args = len(args) > 1 or final is not _MISSING
        name = names[-1]
        if has_args:
            if self._method(receiver, name) is not None:
                raise self.error(f"wrong number of args for {name}: want 0", node)
            raise self.error(f"{name} has arguments but cannot be invoked as field", node)
        return self.field(receiver, name, node)

    @staticmethod
    def _method(receiver: Any, name: str) -> Callable[[], Any] | None:
        if isinstance(receiver, GoStruct):
            if name in receiver.methods:
                return receiver.methods[name]
            if name == "String" and receiver.string is not None:
                return receiver.string
            return None
        if name == "String":
            return _stringer(receiver)
        return None

    def field(self, receiver: Any, name: str, node: Node) -> Any:
        method = self._method(receiver, name)
        if method is not None:
            return method()
        if isinstance(receiver, GoStruct):
            if name in receiver.fields:
                return receiver.fields[name]
            raise self.error(f"can't evaluate field {name} in type {_go_type(receiver)}", node)
        if isinstance(receiver, Mapping):
            return receiver.get(name)
        if receiver is None:
            return None
        raise self.error(f"can't evaluate field {name} in type {_go_type(receiver)}", node)

    def eval_arg(self, dot: Any, node: Node) -> Any:
        self.step(node)
        if isinstance(node, DotNode):
            return dot
        if isinstance(node, NilNode):
            return None
        if isinstance(node, FieldNode):
            return self.eval_fields(dot, dot, node.ident, [node], _MISSING, node)
        if isinstance(node, VariableNode):
            value = self.var(node.ident[0])
            if len(node.ident) == 1:
                return value
            return self.eval_fields(dot, value, node.ident[1:], [node], _MISSING, node)
        if isinstance(node, PipeNode):
            return self.eval_pipeline(dot, node)
        if isinstance(node, IdentifierNode):
            return self.call(dot, node, [], _MISSING)
        if isinstance(node, ChainNode):
            if isinstance(node.node, NilNode):
                raise self.error("indirection through explicit nil", node)
            return self.eval_fields(dot, self.eval_arg(dot, node.node), node.field, [node], _MISSING, node)
        if isinstance(node, LiteralNode):
            return node.value
        raise self.error(f"can't handle {type(node).__name__} as argument", node)  # pragma: no cover

    # functions ------------------------------------------------------------------------------------------------

    def call(self, dot: Any, ident: IdentifierNode, arg_nodes: list[Node], final: Any) -> Any:
        name = ident.name
        if name in ("and", "or"):
            if not arg_nodes and final is _MISSING:
                raise self.error(f"wrong number of args for {name}: want at least 1 got 0", ident)
            value: Any = None
            for arg in arg_nodes:
                value = self.eval_arg(dot, arg)
                if _truth(value) == (name == "or"):
                    return value
            if final is not _MISSING:
                value = final
            return value
        args = [self.eval_arg(dot, a) for a in arg_nodes]
        if final is not _MISSING:
            args.append(final)
        self.node = ident
        fn = _FUNCS.get(name)
        if fn is None:
            raise self.error(f"{name} is not supported", ident)
        arity = _ARITY.get(name)
        if arity is not None:
            lo, hi = arity
            if len(args) < lo or (hi is not None and len(args) > hi):
                want = str(lo) if hi == lo else f"at least {lo}" if hi is None else f"{lo} to {hi}"
                raise self.error(f"wrong number of args for {name}: want {want} got {len(args)}", ident)
        try:
            return self.budget.checked(fn(args))
        except (_FuncError, TemplateError) as exc:
            raise self.error(f"error calling {name}: {exc}", ident) from None


class _FuncError(Exception):
    pass


def _eq(a: Any, b: Any) -> bool:
    ka, kb = _kind(a), _kind(b)
    if ka != kb:
        if ka == "invalid" or kb == "invalid":
            return False
        raise _FuncError("incompatible types for comparison")
    if ka == "invalid":
        return True
    if ka != "other":
        return bool(a == b)
    if isinstance(a, (list, tuple, Mapping)) or isinstance(b, (list, tuple, Mapping)):
        raise _FuncError(f"non-comparable types {_go_type(a)} and {_go_type(b)}")
    return a is b


def _fn_eq(args: list[Any]) -> bool:
    if len(args) < 2:
        raise _FuncError("missing argument for comparison")
    return any(_eq(args[0], b) for b in args[1:])


def _lt(a: Any, b: Any) -> bool:
    ka, kb = _kind(a), _kind(b)
    if ka not in ("int", "float", "string") or kb not in ("int", "float", "string"):
        raise _FuncError("invalid type for comparison")
    if ka != kb:
        raise _FuncError("incompatible types for comparison")
    return bool(a < b)


def _fn_len(args: list[Any]) -> int:
    item = args[0]
    if item is None:
        raise _FuncError("len of nil pointer")
    if isinstance(item, str):
        return len(item.encode("utf-8"))
    if isinstance(item, (list, tuple, Mapping)):
        return len(item)
    raise _FuncError(f"len of type {_go_type(item)}")


def _index_arg(index: Any, cap: int) -> int:
    if not isinstance(index, int) or isinstance(index, bool):
        raise _FuncError(f"cannot index slice/array with type {_go_type(index)}")
    if index < 0 or index >= cap:
        raise _FuncError(f"index out of range: {index}")
    return index


def _fn_index(args: list[Any]) -> Any:
    item = args[0]
    for index in args[1:]:
        if item is None:
            raise _FuncError("index of untyped nil")
        if isinstance(item, str):
            raw = item.encode("utf-8")
            item = raw[_index_arg(index, len(raw))]
        elif isinstance(item, (list, tuple)):
            item = item[_index_arg(index, len(item))]
        elif isinstance(item, Mapping):
            item = item.get(index)
        else:
            raise _FuncError(f"can't index item of type {_go_type(item)}")
    return item


def _fn_slice(args: list[Any]) -> Any:
    item, idx = args[0], args[1:]
    if item is None:
        raise _FuncError("slice of untyped nil")
    if len(idx) > 3:
        raise _FuncError(f"too many slice indexes: {len(idx)}")
    if isinstance(item, str):
        if len(idx) == 3:
            raise _FuncError("cannot 3-index slice a string")
        seq: Any = item.encode("utf-8")
    elif isinstance(item, (list, tuple)):
        seq = item
    else:
        raise _FuncError(f"can't slice item of type {_go_type(item)}")
    cap = len(seq)
    bounds = [0, cap]
    for i, x in enumerate(idx[:2]):
        if not isinstance(x, int) or isinstance(x, bool):
            raise _FuncError(f"cannot index slice/array with type {_go_type(x)}")
        if x < 0 or x > cap:
            raise _FuncError(f"index out of range: {x}")
        bounds[i] = x
    if len(idx) == 3:
        third = idx[2]
        if not isinstance(third, int) or third < bounds[1] or third > cap:
            raise _FuncError(f"index out of range: {third}")
    if bounds[0] > bounds[1]:
        raise _FuncError(f"invalid slice index: {bounds[0]} > {bounds[1]}")
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
        raise _FuncError(f"wrong type for value; expected string; got {_go_type(args[0])}")
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
                raise _FuncError(f"wrong type for value; expected string; got {_go_type(a)}")
        return (_dt.date.today() + _dt.timedelta(days=offset_days)).isoformat()

    return fn


def _fn_typescript(args: list[Any]) -> str:
    value = args[0]
    if isinstance(value, GoStruct) and "ToTypeScriptType" in value.methods:
        return str(value.methods["ToTypeScriptType"]())
    return "any"


def _fn_call(args: list[Any]) -> Any:
    raise _FuncError("call is not supported in chat templates")


_FUNCS: dict[str, Callable[[list[Any]], Any]] = {
    "not": lambda a: not _truth(a[0]),
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


# --------------------------------------------------------------------------------------------------------------------
# Tree inspection (Ollama's heuristics)


def identifiers(node: Node | None) -> list[str]:
    """Field and variable identifiers a node uses, as Ollama's `Identifiers` walks them."""
    if node is None:
        return []
    if isinstance(node, ListNode):
        return [name for child in node.nodes for name in identifiers(child)]
    if isinstance(node, TemplateNode):
        if node.pipe is None:
            raise GoTemplateError("template: undefined template specified (a {{template}} call needs a pipeline)")
        return identifiers(node.pipe)
    if isinstance(node, ActionNode):
        return identifiers(node.pipe)
    if isinstance(node, BranchNode):
        return identifiers(node.pipe) + identifiers(node.list) + identifiers(node.else_list)
    if isinstance(node, PipeNode):
        return [name for cmd in node.cmds for arg in cmd.args for name in identifiers(arg)]
    if isinstance(node, (FieldNode, VariableNode)):
        return list(node.ident)
    return []


def _cut_after_response(root: ListNode) -> ListNode:
    """A copy of the tree with everything after the first `.Response` field removed (Ollama's deleteNode)."""
    cut = False

    def fn(n: Node) -> bool:
        nonlocal cut
        if isinstance(n, FieldNode) and "Response" in n.ident:
            cut = True
            return False
        return cut

    def walk(n: Node) -> Node | None:
        if fn(n):
            return None
        if isinstance(n, ListNode):
            return ListNode(n.pos, [c for c in (walk(x) for x in n.nodes) if c is not None])
        if isinstance(n, BranchNode):
            body = walk(n.list)
            else_list = walk(n.else_list) if n.else_list is not None else None
            return type(n)(
                n.pos,
                n.pipe,
                body if isinstance(body, ListNode) else ListNode(n.pos),
                else_list if isinstance(else_list, ListNode) else None,
            )
        if isinstance(n, ActionNode):
            pipe = walk(n.pipe)
            return ActionNode(n.pos, pipe) if isinstance(pipe, PipeNode) else None
        if isinstance(n, PipeNode):
            cmds: list[CommandNode] = []
            for c in n.cmds:
                args = [a for a in (walk(x) for x in c.args) if a is not None]
                if not args:
                    return None
                cmds.append(CommandNode(c.pos, args))
            if not cmds:
                return None
            return PipeNode(n.pos, n.decl, n.is_assign, cmds)
        return n

    result = walk(root)
    return result if isinstance(result, ListNode) else ListNode(root.pos)


def _find_tool_calls_if(nodes: list[Node]) -> IfNode | None:
    def is_tool_calls(n: IfNode) -> bool:
        return any(isinstance(arg, FieldNode) and "ToolCalls" in arg.ident for cmd in n.pipe.cmds for arg in cmd.args)

    for node in nodes:
        if isinstance(node, IfNode):
            if is_tool_calls(node):
                return node
            found = _find_tool_calls_if(node.list.nodes)
            if found is None and node.else_list is not None:
                found = _find_tool_calls_if(node.else_list.nodes)
            if found is not None:
                return found
        elif isinstance(node, ListNode):
            found = _find_tool_calls_if(node.nodes)
            if found is not None:
                return found
        elif isinstance(node, (RangeNode, WithNode)):
            found = _find_tool_calls_if(node.list.nodes)
            if found is None and node.else_list is not None:
                found = _find_tool_calls_if(node.else_list.nodes)
            if found is not None:
                return found
    return None


def _first_text(nodes: list[Node]) -> TextNode | None:
    for node in nodes:
        if isinstance(node, TextNode):
            if not node.text.strip(" \t\r\n\v\f"):
                continue
            return node
        if isinstance(node, BranchNode):
            found = _first_text(node.list.nodes)
            if found is None and node.else_list is not None:
                found = _first_text(node.else_list.nodes)
            return found
        if isinstance(node, ListNode):
            found = _first_text(node.nodes)
            if found is not None:
                return found
        if isinstance(node, ActionNode):
            return None
    return None


def _visit(node: Node | None, enter: Callable[[Node], None], ancestors: list[Node]) -> None:
    if node is None:
        return
    ancestors.append(node)
    try:
        enter(node)
        if isinstance(node, ListNode):
            for child in node.nodes:
                _visit(child, enter, ancestors)
        elif isinstance(node, BranchNode):
            _visit(node.pipe, enter, ancestors)
            _visit(node.list, enter, ancestors)
            _visit(node.else_list, enter, ancestors)
        elif isinstance(node, (ActionNode, TemplateNode)):
            _visit(node.pipe, enter, ancestors)
        elif isinstance(node, PipeNode):
            for cmd in node.cmds:
                _visit(cmd, enter, ancestors)
        elif isinstance(node, CommandNode):
            for arg in node.args:
                _visit(arg, enter, ancestors)
    finally:
        ancestors.pop()


def infer_thinking_tags(root: ListNode) -> tuple[str, str]:
    """Ollama's heuristic: the text around `.Thinking` inside a `range .Messages` (empty strings if none)."""
    ancestors: list[Node] = []
    tags = ["", ""]

    def range_uses_messages(r: RangeNode) -> bool:
        found = False

        def enter(n: Node) -> None:
            nonlocal found
            if isinstance(n, FieldNode) and n.ident[0] == "Messages":
                found = True

        _visit(r.pipe, enter, [])
        return found

    def enter(n: Node) -> None:
        if not (isinstance(n, FieldNode) and n.ident and n.ident[0] == "Thinking"):
            return
        nearest_range = next((a for a in reversed(ancestors) if isinstance(a, RangeNode)), None)
        if nearest_range is None or not range_uses_messages(nearest_range):
            return
        lst = next((a for a in reversed(ancestors) if isinstance(a, ListNode)), None)
        if lst is None or not lst.nodes:
            return
        if isinstance(lst.nodes[0], TextNode):
            tags[0] = lst.nodes[0].text.strip()
        if isinstance(lst.nodes[-1], TextNode):
            tags[1] = lst.nodes[-1].text.strip()

    _visit(root, enter, ancestors)
    return tags[0], tags[1]


# --------------------------------------------------------------------------------------------------------------------
# Ollama's template values


def _property_type(value: Any) -> GoList:
    types = [value] if isinstance(value, str) else [str(t) for t in value] if isinstance(value, list) else []
    out = GoList(types)
    out.string = lambda: "" if not types else types[0] if len(types) == 1 else "[" + " ".join(types) + "]"
    return out


def _typescript(prop: GoStruct) -> str:
    any_of = prop.fields["AnyOf"]
    if any_of:
        return " | ".join(_typescript(p) for p in any_of)
    types = prop.fields["Type"]
    mapping = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean", "array": "any[]",
               "object": "Record<string, any>", "null": "null"}  # fmt: skip
    if not types:
        return "any"
    return " | ".join(mapping.get(t, "any") for t in types)


def _tool_property(raw: Any) -> GoStruct:
    spec = raw if isinstance(raw, Mapping) else {}
    any_of = [_tool_property(p) for p in spec.get("anyOf") or [] if isinstance(p, Mapping)]
    nested = spec.get("properties")
    properties = (
        OrderedMap((str(k), _tool_property(v)) for k, v in nested.items()) if isinstance(nested, Mapping) else None
    )
    enum = spec.get("enum")
    required = spec.get("required")
    prop = GoStruct(
        "api.ToolProperty",
        {
            "AnyOf": any_of,
            "Type": _property_type(spec.get("type")),
            "Items": spec.get("items"),
            "Description": str(spec.get("description") or ""),
            "Enum": list(enum) if isinstance(enum, list) else [],
            "Properties": properties,
            "Required": [str(r) for r in required] if isinstance(required, list) else [],
        },
    )

    def to_json() -> str:
        f = prop.fields
        parts = []
        if f["AnyOf"]:
            parts.append('"anyOf":' + go_json(f["AnyOf"]))
        types = f["Type"]
        if types:
            parts.append('"type":' + (go_json(types[0]) if len(types) == 1 else go_json(list(types))))
        if f["Items"] is not None:
            parts.append('"items":' + go_json(f["Items"]))
        if f["Description"]:
            parts.append('"description":' + go_json(f["Description"]))
        if f["Enum"]:
            parts.append('"enum":' + go_json(f["Enum"]))
        if f["Properties"] is not None:
            parts.append('"properties":' + go_json(f["Properties"]))
        if f["Required"]:
            parts.append('"required":' + go_json(f["Required"]))
        return "{" + ",".join(parts) + "}"

    prop.json = to_json
    prop.methods["ToTypeScriptType"] = lambda: _typescript(prop)
    return prop


def _tool_value(raw: Any) -> GoStruct:
    """A tool as Ollama's templateTool: JSON when printed, fields Type, Items, Function."""
    if hasattr(raw, "to_dict") and not isinstance(raw, Mapping):
        raw = raw.to_dict()
    tool = raw if isinstance(raw, Mapping) else {}
    fn = tool.get("function") if isinstance(tool.get("function"), Mapping) else {}
    assert isinstance(fn, Mapping)
    params = fn.get("parameters") if isinstance(fn.get("parameters"), Mapping) else {}
    assert isinstance(params, Mapping)
    raw_props = params.get("properties")
    props: GoMap | None = None
    if isinstance(raw_props, Mapping):
        props = GoMap((str(k), _tool_property(v)) for k, v in raw_props.items())
    prop_map = props if props is not None else GoMap()
    prop_map.string = lambda: go_json(prop_map)
    required = params.get("required")
    parameters = GoStruct(
        "template.templateToolFunctionParameters",
        {
            "Type": str(params.get("type") or ""),
            "Defs": params.get("$defs"),
            "Items": params.get("items"),
            "Required": [str(r) for r in required] if isinstance(required, list) else [],
            "Properties": prop_map,
        },
    )

    def params_json() -> str:
        f = parameters.fields
        parts = ['"type":' + go_json(f["Type"])]
        if f["Defs"] is not None:
            parts.append('"$defs":' + go_json(f["Defs"]))
        if f["Items"] is not None:
            parts.append('"items":' + go_json(f["Items"]))
        if f["Required"]:
            parts.append('"required":' + go_json(f["Required"]))
        parts.append('"properties":' + (go_json(prop_map) if props is not None else "null"))
        return "{" + ",".join(parts) + "}"

    parameters.json = params_json
    parameters.string = params_json
    function = GoStruct(
        "template.templateToolFunction",
        {"Name": str(fn.get("name") or ""), "Description": str(fn.get("description") or ""), "Parameters": parameters},
    )

    def function_json() -> str:
        f = function.fields
        return (
            '{"name":'
            + go_json(f["Name"])
            + ',"description":'
            + go_json(f["Description"])
            + ',"parameters":'
            + (params_json() + "}")
        )

    function.json = function_json
    function.string = function_json
    value = GoStruct(
        "template.templateTool",
        {"Type": str(tool.get("type") or ""), "Items": tool.get("items"), "Function": function},
    )

    def tool_json() -> str:
        f = value.fields
        items = ',"items":' + go_json(f["Items"]) if f["Items"] is not None else ""
        return '{"type":' + go_json(f["Type"]) + items + ',"function":' + function_json() + "}"

    value.json = tool_json
    value.string = tool_json
    return value


def _tools_value(tools: Sequence[Any] | None) -> GoList:
    out = GoList(_tool_value(t) for t in tools or ())
    is_nil = tools is None
    out.string = lambda: "null" if is_nil else go_json(list(out))
    return out


def _arguments(raw: Any) -> GoMap:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raw = {}
    args = GoMap(raw.items()) if isinstance(raw, Mapping) else GoMap()
    args.string = lambda: go_json(args)
    return args


def _tool_call_value(raw: Any) -> GoStruct:
    if hasattr(raw, "function") and not isinstance(raw, Mapping):
        raw = {
            "id": getattr(raw, "id", ""),
            "function": {
                "name": raw.function.name,
                "arguments": raw.function.arguments,
                "index": getattr(raw.function, "index", 0),
            },
        }
    call = raw if isinstance(raw, Mapping) else {}
    fn = call.get("function") if isinstance(call.get("function"), Mapping) else call
    assert isinstance(fn, Mapping)
    index = fn.get("index", 0)
    function = GoStruct(
        "template.templateToolCallFunction",
        {
            "Index": index if isinstance(index, int) else 0,
            "Name": str(fn.get("name") or ""),
            "Arguments": _arguments(fn.get("arguments")),
        },
    )
    return GoStruct("template.templateToolCall", {"ID": str(call.get("id") or ""), "Function": function})


def _message_value(m: Mapping[str, Any], content: str) -> GoStruct:
    calls = [_tool_call_value(c) for c in m.get("tool_calls") or ()]
    images = list(m.get("images") or ())
    msg = GoStruct(
        "template.templateMessage",
        {
            "Role": str(m.get("role") or ""),
            "Content": content,
            "Thinking": str(m.get("thinking") or ""),
            "Images": images,
            "ToolCalls": calls,
            "ToolName": str(m.get("tool_name") or m.get("name") or ""),
            "ToolCallID": str(m.get("tool_call_id") or ""),
        },
        pointer=True,
    )

    def to_json() -> str:
        f = msg.fields
        parts = [
            '"Role":' + go_json(f["Role"]),
            '"Content":' + go_json(f["Content"]),
            '"Thinking":' + go_json(f["Thinking"]),
            '"Images":' + (go_json(f["Images"]) if f["Images"] else "null"),
            '"ToolCalls":'
            + (
                "["
                + ",".join(
                    '{"ID":'
                    + go_json(c.fields["ID"])
                    + ',"Function":{"Index":'
                    + go_json(c.fields["Function"].fields["Index"])
                    + ',"Name":'
                    + go_json(c.fields["Function"].fields["Name"])
                    + ',"Arguments":'
                    + go_json(c.fields["Function"].fields["Arguments"])
                    + "}}"
                    for c in f["ToolCalls"]
                )
                + "]"
                if f["ToolCalls"]
                else "null"
            ),
            '"ToolName":' + go_json(f["ToolName"]),
            '"ToolCallID":' + go_json(f["ToolCallID"]),
        ]
        return "{" + ",".join(parts) + "}"

    msg.json = to_json
    return msg


def collate(messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[Mapping[str, Any], str]]]:
    """Ollama's collate: all system text joined, and consecutive same-role messages (not tool ones) merged.

    Returns (system, [(message, content)]) where content is the merged content for that message.
    """
    system: list[str] = []
    out: list[list[Any]] = []
    for m in messages:
        role = m.get("role")
        content = str(m.get("content") or "")
        if role == "system":
            system.append(content)
        if out and out[-1][0].get("role") == role and role != "tool":
            out[-1][1] += "\n\n" + content
        else:
            out.append([m, content])
    return "\n\n".join(system), [(m, c) for m, c in out]


def _think_values(think: bool | str | None) -> dict[str, Any]:
    if think is None:
        return {"Think": False, "ThinkLevel": "", "IsThinkSet": False}
    if isinstance(think, str):
        level = think.strip().lower()
        enabled = level not in ("", "false", "none", "off", "0")
        if level == "true":
            return {"Think": True, "ThinkLevel": "", "IsThinkSet": True}
        return {"Think": enabled, "ThinkLevel": level if enabled else "", "IsThinkSet": True}
    return {"Think": bool(think), "ThinkLevel": "", "IsThinkSet": True}


# --------------------------------------------------------------------------------------------------------------------
# The template


def _response_action() -> ActionNode:
    return ActionNode(-1, PipeNode(-1, [], False, [CommandNode(-1, [FieldNode(-1, ["Response"])])]))


@attrs.define
class GoTemplate(ChatTemplate):
    """An Ollama (Go text/template) chat template, rendered as Ollama renders it."""

    source: str
    limits: TemplateLimits | None = attrs.field(default=None, kw_only=True)  # None: `TemplateLimits()` per render
    _src: _Source = attrs.field(init=False, repr=False)
    _root: ListNode = attrs.field(init=False, repr=False)
    _defines: dict[str, ListNode] = attrs.field(init=False, repr=False)
    _vars: list[str] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._src = _Source(self.source)
        self._root, self._defines = parse_go_template(self.source)
        names: set[str] = set()
        for tree in (self._root, *self._defines.values()):
            names.update(n.lower() for n in identifiers(tree))
        if "messages" not in names and "response" not in names:
            self._root.nodes.append(_response_action())
            names.add("response")
        self._vars = sorted(names)

    # inspection -----------------------------------------------------------------------------------------------

    def vars(self) -> list[str]:
        """The lower-cased field and variable names the template uses (Ollama's `Vars`)."""
        return list(self._vars)

    @property
    def uses_messages(self) -> bool:
        return "messages" in self._vars

    @property
    def supports_tools(self) -> bool:
        return "tools" in self._vars

    @property
    def supports_system(self) -> bool:
        return "system" in self._vars or "messages" in self._vars

    @property
    def supports_suffix(self) -> bool:
        """Whether the template takes a `.Suffix` (fill-in-the-middle; Ollama's "insert" capability)."""
        return "suffix" in self._vars

    def thinking_tags(self) -> tuple[str, str] | None:
        """The (open, close) tags around `.Thinking`, as Ollama infers them; None if the template has none."""
        opening, closing = infer_thinking_tags(self._root)
        return (opening, closing) if opening and closing else None

    def tool_call_tag(self) -> str:
        """The tag Ollama's tool parser looks for: the text opening `{{ if .ToolCalls }}`, else "{"."""
        node = _find_tool_calls_if(self._root.nodes)
        if node is None:
            return "{"
        text = _first_text(node.list.nodes)
        if text is None:
            return "{"
        tag = text.text.replace("\r\n", "\n").split("{", 1)[0].strip()
        return tag or "{"

    def tool_call_prefix(self) -> str | None:
        """The explicit tool-call tag (e.g. "<tool_call>", "[TOOL_CALLS]"); None when calls are bare JSON."""
        tag = self.tool_call_tag()
        return None if tag in ("{", "[") else tag

    # rendering ------------------------------------------------------------------------------------------------

    def execute(self, values: Mapping[str, Any], *, root: ListNode | None = None) -> str:
        """Run the template on a values map (already in template shape), under the template's limits.

        Within a render (legacy templates run once per turn) every run spends the render's one budget.
        """
        with self._budget() as budget:
            state = _State(self._src, self._defines, values, budget)
            try:
                state.walk(values, root if root is not None else self._root)
            except (_Break, _Continue):  # pragma: no cover - the parser only allows these inside range
                raise state.error("break or continue outside range") from None
            except RecursionError:
                raise state.error("template nested too deeply") from None
            return "".join(state.out)

    def _budget(self) -> AbstractContextManager[RenderBudget]:
        return render_budget(self.limits if self.limits is not None else TemplateLimits())

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        think: bool | str | None = None,
        **extra: Any,
    ) -> str:
        """Render a conversation as Ollama does (`add_generation_prompt` is implied by the template itself)."""
        msgs = [m if isinstance(m, Mapping) else m.to_template_dict() for m in messages]
        system, collated = collate(msgs)
        thinking = _think_values(think)
        with self._budget():
            if self.uses_messages:
                values: dict[str, Any] = {
                    "System": system,
                    "Messages": GoList(_message_value(m, content) for m, content in collated),
                    "Tools": _tools_value(list(tools) if tools is not None else None),
                    "Response": "",
                    **thinking,
                }
                return self.execute(values)
            return self._render_legacy(collated, thinking)

    def _render_legacy(self, collated: list[tuple[Mapping[str, Any], str]], thinking: dict[str, Any]) -> str:
        out: list[str] = []
        system = prompt = response = ""

        def run(root: ListNode | None = None) -> None:
            values = {"System": system, "Prompt": prompt, "Response": response, **thinking}
            out.append(self.execute(values, root=root))

        for m, content in collated:
            role = m.get("role")
            if role == "system":
                if prompt or response:
                    run()
                    system = prompt = response = ""
                system = content
            elif role == "user":
                if response:
                    run()
                    system = prompt = response = ""
                prompt = content
            elif role == "assistant":
                response = content
        run(_cut_after_response(self._root))
        return "".join(out)

    def render_suffix(self, prompt: str, suffix: str, *, think: bool | str | None = None) -> str:
        """Render a fill-in-the-middle prompt (`generate` with a suffix) as Ollama does."""
        values = {"Prompt": prompt, "Suffix": suffix, "Response": "", **_think_values(think)}
        return self.execute(values)
