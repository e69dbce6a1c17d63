"""gpt-oss's harmony format: the prompt it is trained on, and its replies split into thinking, content and calls.

A harmony conversation is a run of messages `<|start|>{header}<|message|>{text}{end}`, where the header names
the author and, for the assistant, a channel: `analysis` (thinking), `final` (the answer) or `commentary`
(tool calls, addressed `to=functions.NAME`). A message ends with `<|end|>`, a call with `<|call|>` and the
last answer with `<|return|>`.

`render_harmony` writes the prompt Ollama writes for gpt-oss (its gpt-oss template, for function tools);
`HarmonyParser` splits a streamed reply the way Ollama's harmony parser does. A model uses them when its
Modelfile says `RENDERER harmony` / `PARSER harmony`, or when its template is a harmony template (`uses_harmony`).
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ..errors import InvalidRequest
from ..gojson import go_json
from ..types import ToolCall, ToolCallFunction
from .base import ChatTemplate, TemplateMessage, Think, ToolSpec
from .gotemplate.ollama import collate
from .tools import new_call_id, tool_function

__all__ = [
    "HARMONY",
    "HarmonyParser",
    "HarmonyTemplate",
    "harmony_final_opened",
    "harmony_reply_start",
    "harmony_think",
    "render_harmony",
    "select_harmony",
    "uses_harmony",
]

#: The name Modelfiles give the format (`RENDERER harmony`, `PARSER harmony`), as in Ollama.
HARMONY = "harmony"

START = "<|start|>"
END = "<|end|>"
MESSAGE = "<|message|>"
CHANNEL = "<|channel|>"
CONSTRAIN = "<|constrain|>"
CALL = "<|call|>"
RETURN = "<|return|>"
_MESSAGE_ENDS = (END, CALL, RETURN)
_MARKERS = (START, END, MESSAGE, CHANNEL)

_SYSTEM_HEAD = "You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\nCurrent date: "
_CHANNELS = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
_FUNCTIONS_CHANNEL = "\nCalls to these tools must go to the commentary channel: 'functions'."
_THINK_LEVELS = ("low", "medium", "high")

# JSON schema types as harmony's TypeScript-like tool definitions spell them.
_TYPESCRIPT = {
    "string": "string",
    "number": "number",
    "integer": "number",
    "boolean": "boolean",
    "array": "any[]",
    "object": "Record<string, any>",
    "null": "null",
}


# --------------------------------------------------------------------------------------------------------------------
# Rendering


def harmony_think(think: Think) -> Think:
    """A request's `think` in harmony's terms: its reasoning levels stop at "high", so "max" is "high"."""
    if think == "max":
        return "high"
    if think is None or isinstance(think, bool) or think in _THINK_LEVELS:
        return think
    raise InvalidRequest(f"think must be true, false, 'low', 'medium', 'high' or 'max', got {think!r}")


def _reasoning(think: Think) -> str:
    """The system message's reasoning line: the level asked, "medium" when thinking is on or unset, none when off."""
    think = harmony_think(think)
    if think is False:
        return ""
    return f"\n\nReasoning: {think if isinstance(think, str) else 'medium'}"


def _typescript(schema: Any) -> str:
    spec = schema if isinstance(schema, Mapping) else {}
    any_of = [s for s in spec.get("anyOf") or () if isinstance(s, Mapping)]
    if any_of:
        return " | ".join(_typescript(s) for s in any_of)
    kind = spec.get("type")
    kinds = [kind] if isinstance(kind, str) else [str(k) for k in kind] if isinstance(kind, list) else []
    return " | ".join(_TYPESCRIPT.get(k, "any") for k in kinds) if kinds else "any"


def _functions_namespace(tools: Sequence[Any]) -> str:
    """The developer message's `# Tools` section: each function as a TypeScript type, properties by name."""
    out = ["# Tools\n\n## functions\n\nnamespace functions {"]
    for tool in tools:
        fn = tool_function(tool)
        name = str(fn.get("name") or "")
        out.append("\n")
        if fn.get("description"):
            out.append(f"\n// {fn['description']}")
        params = fn.get("parameters") if isinstance(fn.get("parameters"), Mapping) else {}
        properties = params.get("properties") if isinstance(params, Mapping) else None
        if isinstance(properties, Mapping) and properties:
            out.append(f"\ntype {name} = (_: {{")
            for prop_name in sorted(properties):  # a Go map: its keys in order
                prop = properties[prop_name] if isinstance(properties[prop_name], Mapping) else {}
                if prop.get("description"):
                    out.append(f"\n  // {prop['description']}")
                out.append(f"\n  {prop_name}: {_typescript(prop)},")
            out.append("\n}) => any;")
        else:
            out.append(f"\ntype {name} = () => any;")
    out.append("\n\n} // namespace functions")
    return "".join(out)


def _arguments_json(arguments: Any) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            arguments = {}
    return go_json(arguments if isinstance(arguments, Mapping) else {})


def _call_parts(call: Any) -> tuple[str, Any]:
    if hasattr(call, "function") and not isinstance(call, Mapping):
        return str(call.function.name), call.function.arguments
    fn = call.get("function", call) if isinstance(call, Mapping) else {}
    return str(fn.get("name") or ""), fn.get("arguments")


def render_harmony(
    messages: Sequence[TemplateMessage],
    *,
    tools: Sequence[ToolSpec] | None = None,
    think: Think = None,
    today: _dt.date | None = None,
) -> str:
    """The harmony prompt for a conversation, as Ollama writes it for gpt-oss.

    The system message carries the date and the reasoning level; the request's system messages and its
    tools go into a developer message; thinking is kept only for assistant turns after the last user
    message. A conversation that ends with an assistant message is left open for the model to go on
    (prefill); any other ends with the assistant's start.
    """
    system, collated = collate(messages)
    day = (today or _dt.date.today()).isoformat()
    parts = [f"{START}system{MESSAGE}{_SYSTEM_HEAD}{day}{_reasoning(think)}\n\n{_CHANNELS}"]
    if tools:
        parts.append(_FUNCTIONS_CHANNEL)
    parts.append(END)
    if tools or system:
        developer = _functions_namespace(tools) if tools else ""
        if system:
            developer += f"\n\n# Instructions\n\n{system}"
        parts.append(f"{START}developer{MESSAGE}{developer}{END}")

    last_user = max((i for i, (m, _) in enumerate(collated) if m.get("role") == "user"), default=-1)
    prefill_content = prefill_thinking = False
    if collated and collated[-1][0].get("role") == "assistant":
        prefill_content = bool(collated[-1][1])
        prefill_thinking = not prefill_content and bool(collated[-1][0].get("thinking"))
    for i, (message, content) in enumerate(collated):
        role = message.get("role")
        if role == "user":
            parts.append(f"{START}user{MESSAGE}{content}{END}")
        elif role == "tool":
            name = str(message.get("tool_name") or message.get("name") or "")
            parts.append(f"{START}functions.{name} to=assistant{MESSAGE}{content}{END}")
        elif role == "assistant":
            thinking = str(message.get("thinking") or "")
            if thinking and i > last_user:
                parts.append(f"{START}assistant{CHANNEL}analysis{MESSAGE}{thinking}{'' if prefill_thinking else END}")
            if content:
                parts.append(f"{START}assistant{CHANNEL}final{MESSAGE}{content}{'' if prefill_content else END}")
            for call in message.get("tool_calls") or ():
                name, arguments = _call_parts(call)
                parts.append(
                    f"{START}assistant{CHANNEL}commentary to=functions.{name} {CONSTRAIN}json{MESSAGE}"
                    f"{_arguments_json(arguments)}{CALL}"
                )
    if not (prefill_content or prefill_thinking):
        parts.append(f"{START}assistant")
    return "".join(parts)


def harmony_reply_start(messages: Sequence[TemplateMessage]) -> str:
    """What the prompt leaves open before the reply: the assistant's start, or the message a prefill goes on with."""
    last = messages[-1] if messages else {}
    if last.get("role") == "assistant":
        if last.get("content"):
            return f"{START}assistant{CHANNEL}final{MESSAGE}"
        if last.get("thinking"):
            return f"{START}assistant{CHANNEL}analysis{MESSAGE}"
    return f"{START}assistant"


def harmony_final_opened(prompt: str, reply_start: str) -> tuple[str, str]:
    """The prompt, and what it leaves open of the reply, with the final message already opened.

    For a reply constrained by a grammar (`format`), which could not write the message's header itself;
    thinking left open is closed first, as Ollama closes it before a structured answer.
    """
    final = f"{START}assistant{CHANNEL}final{MESSAGE}"
    if reply_start == final:
        return prompt, reply_start
    if reply_start.endswith(f"{CHANNEL}analysis{MESSAGE}"):
        return prompt + END + final, final
    opening = final.removeprefix(reply_start)
    return prompt + opening, final


@attrs.define
class HarmonyTemplate(ChatTemplate):
    """A chat template that prompts in harmony: `render_harmony`, or `inner`'s own rendering when given.

    With `inner` (a Modelfile's `PARSER harmony` over its TEMPLATE) the template writes the prompt and only
    the reply is read as harmony; without it (`RENDERER harmony`) the prompt is written here too.
    """

    inner: ChatTemplate | None = None
    source: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.source = self.inner.source if self.inner is not None else ""

    def render(
        self,
        messages: Sequence[TemplateMessage],
        *,
        tools: Sequence[ToolSpec] | None = None,
        add_generation_prompt: bool = True,
        think: Think = None,
        **variables: object,
    ) -> str:
        if self.inner is not None:
            return self.inner.render(
                messages, tools=tools, add_generation_prompt=add_generation_prompt, think=think, **variables
            )
        return render_harmony(messages, tools=tools, think=think)

    @property
    def supports_tools(self) -> bool:
        return True


def uses_harmony(template: ChatTemplate) -> bool:
    """Whether prompts and replies are harmony: chosen by a Modelfile, or a template that writes harmony's markers."""
    return isinstance(template, HarmonyTemplate) or all(marker in template.source for marker in _MARKERS)


def select_harmony(template: ChatTemplate, *, renderer: str | None, parser: str | None) -> ChatTemplate:
    """The template a model prompts with, given its Modelfile's RENDERER and PARSER."""
    if renderer == HARMONY:
        return HarmonyTemplate()
    if parser == HARMONY:
        return HarmonyTemplate(inner=template)
    return template


# --------------------------------------------------------------------------------------------------------------------
# Parsing


def _held_back(text: str, markers: Sequence[str]) -> int:
    """How many characters at the end of `text` could be the start of one of `markers`."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


@attrs.define
class _Header:
    role: str = ""
    channel: str = ""
    recipient: str = ""


def _parse_header(raw: str) -> _Header:
    """`assistant<|channel|>commentary to=functions.f <|constrain|>json` → role, channel and recipient."""
    header = _Header()
    raw = raw.replace(CONSTRAIN, f" {CONSTRAIN}", 1).strip()
    before, found, after = raw.partition(CHANNEL)
    if found:
        words = after.split(maxsplit=1)
        header.channel = words[0] if words else ""
        raw = (before + " " + (words[1] if len(words) > 1 else "")).strip()
    tokens = raw.split()
    if not tokens:
        return header
    if tokens[0].startswith("to="):
        header.role, header.recipient = "tool", tokens[0][3:]
    else:
        header.role = tokens[0]
        if len(tokens) > 1 and tokens[1].startswith("to="):
            header.recipient = tokens[1][3:]
    return header


class HarmonyParser:
    """A harmony reply's stream split three ways: `feed(text) -> (thinking, content, calls)`, then `finish()`.

    As in Ollama: the `analysis` channel is thinking, `final` (and `commentary` to no one) is content, and a
    message to a recipient (`to=functions.NAME`) is a tool call whose text is its JSON arguments. Markers split
    across pieces are held back until they can be told apart from text.
    """

    def __init__(self, reply_start: str = f"{START}assistant") -> None:
        # The prompt ends inside the reply's first message; reading it again puts the parser where the model is.
        self._buffer = reply_start
        self._state = "start"  # "start": before a message; "header": inside one's header; "body": in its text
        self._header = _Header()
        self._arguments: list[str] = []
        self._count = 0

    def feed(self, text: str) -> tuple[str, str, list[ToolCall]]:
        self._buffer += text
        thinking: list[str] = []
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self._state == "start":
                at = self._buffer.find(START)
                if at < 0:
                    # Text between messages is not part of any; only a marker's beginning is worth keeping.
                    keep = _held_back(self._buffer, (START,))
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                self._buffer = self._buffer[at + len(START) :]
                self._state = "header"
            elif self._state == "header":
                at = self._buffer.find(MESSAGE)
                if at < 0:
                    break
                self._header = _parse_header(self._buffer[:at])
                self._buffer = self._buffer[at + len(MESSAGE) :]
                self._state = "body"
            else:
                ends = [(i, end) for end in _MESSAGE_ENDS if (i := self._buffer.find(end)) >= 0]
                if ends:
                    at, end = min(ends)
                    self._emit(self._buffer[:at], thinking, content)
                    self._buffer = self._buffer[at + len(end) :]
                    self._end_message(content, calls)
                    continue
                keep = _held_back(self._buffer, _MESSAGE_ENDS)
                self._emit(self._buffer[: len(self._buffer) - keep], thinking, content)
                self._buffer = self._buffer[len(self._buffer) - keep :]
                break
        return "".join(thinking), "".join(content), calls

    def finish(self) -> tuple[str, str, list[ToolCall]]:
        """The rest: text held back in a message's body is its text after all, and an open call is complete."""
        thinking: list[str] = []
        content: list[str] = []
        calls: list[ToolCall] = []
        if self._state == "body":
            self._emit(self._buffer, thinking, content)
            self._end_message(content, calls)
        self._buffer = ""
        return "".join(thinking), "".join(content), calls

    def _is_call(self) -> bool:
        return bool(self._header.recipient) and self._header.channel in ("analysis", "commentary")

    def _emit(self, text: str, thinking: list[str], content: list[str]) -> None:
        if not text:
            return
        if self._is_call():
            self._arguments.append(text)
        elif self._header.channel == "analysis":
            thinking.append(text)
        else:
            content.append(text)

    def _end_message(self, content: list[str], calls: list[ToolCall]) -> None:
        if self._is_call():
            call = self._call(self._header.recipient.removeprefix("functions."), "".join(self._arguments))
            if call is None:  # arguments that are not a JSON object: kept as the model wrote them
                content.append("".join(self._arguments))
            else:
                calls.append(call)
        self._arguments = []
        self._header = _Header()
        self._state = "start"

    def _call(self, name: str, raw: str) -> ToolCall | None:
        try:
            arguments = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return None
        if isinstance(arguments, list) and len(arguments) == 1:  # a call's arguments wrapped in an array
            arguments = arguments[0]
        if not isinstance(arguments, dict):
            return None
        call = ToolCall(function=ToolCallFunction(name=name, arguments=arguments, index=self._count), id=new_call_id())
        self._count += 1
        return call
