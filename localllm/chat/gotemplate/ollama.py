"""Ollama's layer over Go templates: the values templates see, and `GoTemplate`, rendered as Ollama renders.

* templates that reference `.Messages` get the whole conversation once, with
  `.System` (every system message joined by a blank line), `.Tools` and an
  empty `.Response`; consecutive messages of the same role (tool messages
  excepted) are merged first;
* legacy templates (`.System`/`.Prompt`/`.Response`) are executed once per
  (system, prompt, response) turn and the renderings concatenated; the last
  turn is cut right after `{{ .Response }}` so the prompt ends where the
  model's answer begins.

Messages, tools and tool calls become Go structs shaped like Ollama's (`template.templateMessage`,
`api.ToolProperty`, ...), printing and marshalling to JSON the way Ollama's do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import attrs

from ...gojson import go_json
from ..base import ChatTemplate, TemplateMessage, Think, ToolSpec
from ..limits import RenderBudget, TemplateLimits, render_budget
from .exec import execute
from .funcs import BUILTIN_NAMES
from .lexer import Source
from .parse import ActionNode, CommandNode, FieldNode, ListNode, PipeNode, parse_go_template
from .tree import cut_after_response, find_tool_calls_if, first_text, identifiers, infer_thinking_tags
from .values import GoList, GoMap, GoStruct, OrderedMap

__all__ = ["GoTemplate", "collate"]

# The values a template reads for a request's `think` setting, and the message field that carries thinking.
_THINKING_NAMES = frozenset({"thinking", "think", "isthinkset", "thinklevel"})


# --------------------------------------------------------------------------------------------------------------------
# The values templates see


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


def _think_values(think: Think) -> dict[str, Any]:
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
    _src: Source = attrs.field(init=False, repr=False)
    _root: ListNode = attrs.field(init=False, repr=False)
    _defines: dict[str, ListNode] = attrs.field(init=False, repr=False)
    _vars: list[str] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._src = Source(self.source)
        self._root, self._defines = parse_go_template(self.source, BUILTIN_NAMES)
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
    def reads_thinking(self) -> bool:
        """Whether the template reads any thinking value (`.Thinking`, `.Think`, `.IsThinkSet`, `.ThinkLevel`)."""
        return not _THINKING_NAMES.isdisjoint(self._vars)

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
        node = find_tool_calls_if(self._root.nodes)
        if node is None:
            return "{"
        text = first_text(node.list.nodes)
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
            return execute(self._src, root if root is not None else self._root, self._defines, values, budget)

    def _budget(self) -> AbstractContextManager[RenderBudget]:
        return render_budget(self.limits if self.limits is not None else TemplateLimits())

    def render(
        self,
        messages: Sequence[TemplateMessage],
        *,
        tools: Sequence[ToolSpec] | None = None,
        add_generation_prompt: bool = True,
        think: Think = None,
        **variables: object,
    ) -> str:
        """Render a conversation as Ollama does.

        `add_generation_prompt` is implied by the template itself, and Ollama's data has no place for other
        `variables`: both are ignored.
        """
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
        run(cut_after_response(self._root))
        return "".join(out)

    def render_suffix(self, prompt: str, suffix: str, *, think: Think = None) -> str:
        """Render a fill-in-the-middle prompt (`generate` with a suffix) as Ollama does."""
        values = {"Prompt": prompt, "Suffix": suffix, "Response": "", **_think_values(think)}
        return self.execute(values)
