"""The executor of Go's text/template: walks a parse tree over a value and writes the output.

Every node visited spends a step of the render's budget and every write counts against its output
limit, so a template stops itself when it runs too long or writes too much.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ...errors import TemplateError
from ..limits import RenderBudget
from .funcs import FuncError, arity_problem, builtin
from .lexer import GoTemplateError, Source
from .parse import (
    ActionNode,
    BreakNode,
    ChainNode,
    CommandNode,
    ContinueNode,
    DotNode,
    FieldNode,
    IdentifierNode,
    IfNode,
    ListNode,
    LiteralNode,
    NilNode,
    Node,
    PipeNode,
    RangeNode,
    TemplateNode,
    TextNode,
    VariableNode,
    WithNode,
)
from .values import GoStruct, OrderedMap, go_fmt, go_type, stringer, truth

__all__ = ["execute"]

MAX_TEMPLATE_DEPTH = 64


class _Break(Exception):
    """`{{break}}`: leaves the innermost range."""


class _Continue(Exception):
    """`{{continue}}`: goes on with the innermost range's next item."""


# No value piped into a command (Go's "missing" reflect.Value), as distinct from nil.
_MISSING: Any = object()


def execute(src: Source, root: ListNode, defines: dict[str, ListNode], data: Any, budget: RenderBudget) -> str:
    """The output of running the tree `root` on `data`; `defines` are the templates it may call."""
    state = _State(src, defines, data, budget)
    try:
        state.walk(data, root)
    except (_Break, _Continue):  # pragma: no cover - the parser only allows these inside range
        raise state.error("break or continue outside range") from None
    except RecursionError:
        raise state.error("template nested too deeply") from None
    return "".join(state.out)


class _State:
    """One execution: the variables in scope, the output so far, the node being run."""

    def __init__(self, src: Source, defines: dict[str, ListNode], root: Any, budget: RenderBudget) -> None:
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
                if truth(value):
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
            return stringer(receiver)
        return None

    def field(self, receiver: Any, name: str, node: Node) -> Any:
        method = self._method(receiver, name)
        if method is not None:
            return method()
        if isinstance(receiver, GoStruct):
            if name in receiver.fields:
                return receiver.fields[name]
            raise self.error(f"can't evaluate field {name} in type {go_type(receiver)}", node)
        if isinstance(receiver, Mapping):
            return receiver.get(name)
        if receiver is None:
            return None
        raise self.error(f"can't evaluate field {name} in type {go_type(receiver)}", node)

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
                if truth(value) == (name == "or"):
                    return value
            if final is not _MISSING:
                value = final
            return value
        args = [self.eval_arg(dot, a) for a in arg_nodes]
        if final is not _MISSING:
            args.append(final)
        self.node = ident
        fn = builtin(name)
        if fn is None:
            raise self.error(f"{name} is not supported", ident)
        problem = arity_problem(name, len(args))
        if problem is not None:
            raise self.error(problem, ident)
        try:
            return self.budget.checked(fn(args))
        except (FuncError, TemplateError) as exc:
            raise self.error(f"error calling {name}: {exc}", ident) from None
