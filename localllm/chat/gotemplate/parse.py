"""The parse tree of Go's text/template and the parser that builds it from the lexer's items.

Nodes are shaped like Go's text/template/parse, so Ollama's tree heuristics carry over. As in Go,
the parser is told which function names exist; it knows nothing of what they do.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from .lexer import KEYWORDS, GoTemplateError, Item, Source, Token, scan

__all__ = [
    "ActionNode", "BranchNode", "BreakNode", "ChainNode", "CommandNode", "ContinueNode", "DotNode", "FieldNode",
    "IdentifierNode", "IfNode", "ListNode", "LiteralNode", "NilNode", "Node", "PipeNode", "RangeNode", "TemplateNode",
    "TextNode", "VariableNode", "WithNode", "parse_go_template",
]  # fmt: skip

MAX_PARSE_DEPTH = 200


# --------------------------------------------------------------------------------------------------------------------
# The tree


class Node:
    """A node of the tree; `pos` is its offset in the template text."""

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
# The parser


class Parser:
    """Builds the tree of one template text, and the templates it defines, from its items."""

    def __init__(self, src: Source, functions: Collection[str]) -> None:
        self.src = src
        self.functions = functions
        self.items = scan(src)
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

    def parse_list(self, *, top: bool = False) -> tuple[ListNode, str | None, Item | None]:
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

    def parse_control(self, kind: str, item: Item, toks: list[Token]) -> BranchNode:
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

    def parse_define(self, item: Item, toks: list[Token]) -> None:
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

    def parse_block(self, item: Item, toks: list[Token]) -> TemplateNode:
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

    def parse_template(self, item: Item, toks: list[Token]) -> TemplateNode:
        if not toks or toks[0].kind != "string":
            raise self.src.error(item.pos, "template needs a template name string")
        pipe = self.parse_pipeline(toks[1:], "template", item.pos) if len(toks) > 1 else None
        return TemplateNode(item.pos, toks[0].value, pipe)

    # pipelines ------------------------------------------------------------------------------------------------

    @staticmethod
    def describe(tok: Token) -> str:
        if tok.kind in ("ident", "field", "var"):
            return repr(("." if tok.kind == "field" else "") + str(tok.value))
        if tok.kind in ("string", "number", "bool"):
            return repr(tok.value)
        return repr(tok.kind)

    def parse_pipeline(self, toks: list[Token], context: str, pos: int) -> PipeNode:
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

    def _commands(self, toks: list[Token], context: str, pos: int) -> list[CommandNode]:
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

    def _command(self, toks: list[Token], idx: int) -> tuple[CommandNode, int]:
        args: list[Node] = []
        pos = toks[idx].pos
        while idx < len(toks) and toks[idx].kind not in ("|", ")"):
            if args and not toks[idx].spaced:
                raise self.src.error(toks[idx].pos, f"unexpected {self.describe(toks[idx])} in operand")
            node, idx = self._operand(toks, idx)
            args.append(node)
        return CommandNode(pos, args), idx

    def _operand(self, toks: list[Token], idx: int) -> tuple[Node, int]:
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

    def _term(self, toks: list[Token], idx: int) -> tuple[Node, int]:
        tok = toks[idx]
        kind = tok.kind
        if kind == "ident":
            if tok.value in KEYWORDS:
                raise self.src.error(tok.pos, f"unexpected {tok.value!r} in operand")
            if tok.value not in self.functions:
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


def parse_go_template(source: str, functions: Collection[str]) -> tuple[ListNode, dict[str, ListNode]]:
    """Parse Go template text into (root list, defined templates); raises TemplateError.

    `functions` are the names a template may call; any other name is an error, as in Go.
    """
    src = Source(source)
    parser = Parser(src, functions)
    try:
        root = parser.parse()
    except RecursionError:
        raise GoTemplateError("template: nested too deeply") from None
    return root, parser.defines
