"""Ollama's readings of a parsed template: the names it uses, where its tool calls and thinking go.

These heuristics decide how a Go template is driven (`.Messages` or the legacy prompt/response
fields), which tag opens a tool call, and which tags wrap the model's thinking.
"""

from __future__ import annotations

from collections.abc import Callable

from .lexer import GoTemplateError
from .parse import (
    ActionNode,
    BranchNode,
    CommandNode,
    FieldNode,
    IfNode,
    ListNode,
    Node,
    PipeNode,
    RangeNode,
    TemplateNode,
    TextNode,
    VariableNode,
    WithNode,
)

__all__ = ["cut_after_response", "find_tool_calls_if", "first_text", "identifiers", "infer_thinking_tags"]


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


def cut_after_response(root: ListNode) -> ListNode:
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


def find_tool_calls_if(nodes: list[Node]) -> IfNode | None:
    """The first `{{ if .ToolCalls }}` among the nodes and the lists they hold (Ollama's findToolCallNode)."""

    def is_tool_calls(n: IfNode) -> bool:
        return any(isinstance(arg, FieldNode) and "ToolCalls" in arg.ident for cmd in n.pipe.cmds for arg in cmd.args)

    for node in nodes:
        if isinstance(node, IfNode):
            if is_tool_calls(node):
                return node
            found = find_tool_calls_if(node.list.nodes)
            if found is None and node.else_list is not None:
                found = find_tool_calls_if(node.else_list.nodes)
            if found is not None:
                return found
        elif isinstance(node, ListNode):
            found = find_tool_calls_if(node.nodes)
            if found is not None:
                return found
        elif isinstance(node, (RangeNode, WithNode)):
            found = find_tool_calls_if(node.list.nodes)
            if found is None and node.else_list is not None:
                found = find_tool_calls_if(node.else_list.nodes)
            if found is not None:
                return found
    return None


def first_text(nodes: list[Node]) -> TextNode | None:
    """The first text that is not only space, looking into the first branch met; None if an action comes first."""
    for node in nodes:
        if isinstance(node, TextNode):
            if not node.text.strip(" \t\r\n\v\f"):
                continue
            return node
        if isinstance(node, BranchNode):
            found = first_text(node.list.nodes)
            if found is None and node.else_list is not None:
                found = first_text(node.else_list.nodes)
            return found
        if isinstance(node, ListNode):
            found = first_text(node.nodes)
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
