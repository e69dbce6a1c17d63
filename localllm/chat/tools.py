"""Find tool calls in a model's streamed output.

`ToolCallParser` reads generated text chunk by chunk and splits it into content
(streamed at once) and tool calls (emitted as soon as each is complete). It
understands the formats open models use:

* Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
* Qwen3-Coder XML: `<function=name><parameter=p>value</parameter></function>`,
  bare or inside `<tool_call>`; values are typed by the tool's schema
* Llama 3.x: a bare JSON object `{"name": ..., "parameters": {...}}` at the start
  of the reply, or after `<|python_tag|>`
* Mistral: `[TOOL_CALLS] [{...}, ...]` and `[TOOL_CALLS]name[ARGS]{...}`
* DeepSeek: `<|tool▁calls▁begin|><|tool▁call▁begin|>function<|tool▁sep|>name
  ```json {...} ```<|tool▁call▁end|>...` (and the V3.1 `name<|tool▁sep|>{...}` form),
  with the bars written as U+FF5C as DeepSeek's tokenizer spells them, or as ASCII
* plain JSON objects or arrays of `{"name": ..., "arguments": ...}` at the start
* a template-specific tag (`prefix`, from `ChatTemplate.tool_call_prefix()`)

A call is only a call when its name is one of the request's tools and its
arguments are an object; anything else is passed through as content, exactly as
the model wrote it. Text split across chunks in the middle of a tag is held back
until it can be decided.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..types import ToolCall, ToolCallFunction
from .thinking import ThinkingParser

__all__ = ["ChatOutputParser", "ToolCallParser", "new_call_id", "parse_tool_calls", "tool_function", "tool_names"]

_ID_ALPHABET = string.ascii_lowercase + string.digits

HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_OPEN = "[TOOL_CALLS]"
MISTRAL_ARGS = "[ARGS]"
MISTRAL_CALL_ID = "[CALL_ID]"
XML_OPEN = "<function="
XML_CLOSE = "</function>"


def _deepseek(word: str) -> tuple[str, str]:
    """A DeepSeek special token in its full-width spelling and the ASCII-bar spelling some templates use."""
    return f"<\uff5c{word}\uff5c>", f"<|{word}|>"


DS_CALLS_BEGIN = _deepseek("tool▁calls▁begin")
DS_CALLS_END = _deepseek("tool▁calls▁end")
DS_CALL_BEGIN = _deepseek("tool▁call▁begin")
DS_CALL_END = _deepseek("tool▁call▁end")
DS_SEP = _deepseek("tool▁sep")
DS_EOS = _deepseek("end▁of▁sentence")

# Markers that open tool calls anywhere in the output; consumed when found.
_OPENERS: tuple[str, ...] = (HERMES_OPEN, PYTHON_TAG, MISTRAL_OPEN, *DS_CALLS_BEGIN)
# Markers that are themselves the start of a call (kept for the call's own parser).
_CALL_STARTS: tuple[str, ...] = (XML_OPEN, *DS_CALL_BEGIN)
# Text that may close a run of calls; swallowed between and after calls.
_CLOSERS: tuple[str, ...] = (
    HERMES_CLOSE,
    "[/TOOL_CALLS]",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|call|>",
    *DS_CALLS_END,
    *DS_EOS,
)
_SPACE = " \t\r\n"
_MAX_NAME = 256


def new_call_id() -> str:
    """A fresh tool call id: `call_` and 8 lowercase letters or digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


def tool_function(tool: Any) -> Mapping[str, Any]:
    """The function part of a tool definition (an OpenAI-style tool, or the function itself)."""
    if hasattr(tool, "to_dict") and not isinstance(tool, Mapping):
        tool = tool.to_dict()
    if not isinstance(tool, Mapping):
        return {}
    fn = tool.get("function")
    return fn if isinstance(fn, Mapping) else tool


def tool_names(tools: Iterable[Any]) -> list[str]:
    """The function names of tool definitions (OpenAI/Ollama shape, or objects with `to_dict`)."""
    names = []
    for tool in tools:
        name = tool_function(tool).get("name")
        if isinstance(name, str) and name:
            names.append(name)
    return names


def _scan_json(text: str) -> int | None:
    """End index of the JSON object/array that starts text; None if incomplete.

    Malformed nesting (a bracket that closes nothing open) gives -(i + 1) for the offending index i.
    """
    stack: list[str] = []
    in_string = escaped = False
    for i, c in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
            continue
        if c == '"':
            in_string = True
        elif c in "{[":
            stack.append("}" if c == "{" else "]")
        elif c in "}]":
            if not stack or stack.pop() != c:
                return -(i + 1)
            if not stack:
                return i + 1
    return None


def _loads(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        pass
    try:  # small models sometimes write Python literals ('single quotes', True)
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _as_arguments(value: Any) -> dict[str, Any] | None:
    if value is None:
        return {}
    if isinstance(value, str):
        if not value.strip():
            return {}
        value = _loads(value)
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    return None


def _strip_one_newline(text: str) -> str:
    if text.startswith("\r\n"):
        text = text[2:]
    elif text.startswith("\n"):
        text = text[1:]
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    return text


def _typed_value(raw: str, schema: Any) -> Any:
    """An XML parameter's text converted to the type its JSON schema asks for."""
    types: list[str] = []
    if isinstance(schema, Mapping):
        t = schema.get("type")
        types = [t] if isinstance(t, str) else [x for x in t if isinstance(x, str)] if isinstance(t, list) else []
        for sub in schema.get("anyOf") or schema.get("oneOf") or ():
            if isinstance(sub, Mapping) and isinstance(sub.get("type"), str):
                types.append(sub["type"])
    text = raw.strip()
    for t in [t for t in types if t != "string"]:
        if t == "integer" and re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        if t == "number" and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
            number = float(text)
            return int(number) if re.fullmatch(r"[+-]?\d+", text) else number
        if t == "boolean" and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if t == "null" and text.lower() in ("null", "none"):
            return None
        if t in ("object", "array"):
            value = _loads(text)
            if isinstance(value, dict if t == "object" else list):
                return value
    if types:
        return raw
    value = _loads(text) if text else None
    return raw if value is None and text.lower() != "null" else value


class ToolCallParser:
    """Streaming tool-call parser: `feed(text) -> (content, calls)`, then `finish() -> (content, calls)`.

    `tools` are the request's tool definitions; `prefix` is the template's tool-call tag
    (`ChatTemplate.tool_call_prefix()`), added to the built-in markers.
    """

    def __init__(self, tools: Sequence[Any], *, prefix: str | None = None) -> None:
        self._tools: dict[str, Mapping[str, Any]] = {}
        for tool in tools:
            fn = tool_function(tool)
            name = fn.get("name")
            if isinstance(name, str) and name:
                self._tools[name] = fn
        self.prefix = prefix
        openers = list(_OPENERS)
        closers = list(_CLOSERS)
        tag = (prefix or "").strip()
        while tag and tag[-1] in "[{ \t\r\n":
            tag = tag[:-1]
        if tag and tag not in openers and tag not in _CALL_STARTS:
            openers.append(tag)
            m = re.fullmatch(r"<([A-Za-z_][\w:.-]*)>", tag) or re.fullmatch(r"\[([A-Za-z_][\w.-]*)\]", tag)
            if m:
                closers.append(f"</{m.group(1)}>" if tag.startswith("<") else f"[/{m.group(1)}]")
            elif tag.startswith("```"):
                closers.append("```")
        self._openers = tuple(openers)
        self._closers = tuple(closers)
        self._markers = self._openers + _CALL_STARTS
        self._waits = self._markers + self._closers
        self._buf = ""
        self._in_calls = False
        self._seen_text = False
        self._lead = ""
        self._bare_json_tried = False
        self._pending = ""
        self._pending_marker = False
        self._expect_name = False
        self._count = 0
        self._called = False  # whether the current tool-call region has yielded a call yet

    @property
    def calls_found(self) -> int:
        return self._count

    @property
    def in_tool_call(self) -> bool:
        """Whether the parser is inside a tool-call region (text is being held, not streamed)."""
        return self._in_calls

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """Flush everything held back at the end of the output."""
        content, calls = self._run(final=True)
        if self._lead and not self._count:
            content = self._lead + content
        self._lead = ""
        return content, calls

    # driving --------------------------------------------------------------------------------------------------

    def _run(self, *, final: bool) -> tuple[str, list[ToolCall]]:
        out: list[str] = []
        calls: list[ToolCall] = []
        progressed = True
        while progressed:
            progressed = self._calls_step(out, calls, final) if self._in_calls else self._content_step(out, final)
        return "".join(out), calls

    def _emit(self, out: list[str], text: str) -> None:
        if not text:
            return
        if not self._seen_text:
            if not text.strip():
                self._lead += text
                return
            text, self._lead = self._lead + text, ""
            self._seen_text = True
        out.append(text)

    def _enter_calls(self, pending: str, *, marker: bool, expect_name: bool = False) -> None:
        self._in_calls = True
        self._called = False
        self._pending = pending
        self._pending_marker = marker
        self._expect_name = expect_name

    def _leave_calls(self, out: list[str]) -> None:
        if self._pending_marker:
            self._emit(out, self._pending)
        self._pending = ""
        self._pending_marker = False
        self._expect_name = False
        self._in_calls = False

    def _fail(self, out: list[str], consumed: int) -> None:
        """The text at the buffer's start is not a call: it (and any unused marker) is content."""
        text = self._pending + self._buf[:consumed]
        self._buf = self._buf[consumed:]
        self._pending = ""
        self._pending_marker = False
        self._expect_name = False
        self._in_calls = False
        self._emit(out, text)

    def _found(self, calls: list[ToolCall], found: list[tuple[str, dict[str, Any]]], consumed: int) -> None:
        for name, arguments in found:
            calls.append(
                ToolCall(function=ToolCallFunction(name=name, arguments=arguments, index=self._count), id=new_call_id())
            )
            self._count += 1
        self._called = True
        self._buf = self._buf[consumed:]
        self._pending = ""
        self._pending_marker = False
        self._expect_name = False
        self._lead = ""

    # content --------------------------------------------------------------------------------------------------

    def _content_step(self, out: list[str], final: bool) -> bool:
        buf = self._buf
        if not buf:
            return False
        if not self._seen_text and not self._bare_json_tried:
            stripped = buf.lstrip(_SPACE)
            if not stripped:
                self._lead += buf
                self._buf = ""
                return False
            if stripped[0] in "{[":
                self._bare_json_tried = True
                self._lead += buf[: len(buf) - len(stripped)]
                self._buf = stripped
                self._enter_calls("", marker=False)
                return True
        idx, marker = self._find_marker(buf)
        if marker is not None:
            self._emit(out, buf[:idx])
            rest = buf[idx:]
            if marker in _CALL_STARTS:
                self._buf = rest
                self._enter_calls("", marker=False)
            else:
                self._buf = rest[len(marker) :]
                self._enter_calls(marker, marker=True, expect_name=marker == MISTRAL_OPEN)
            return True
        keep = 0 if final else self._partial_suffix(buf)
        self._emit(out, buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep :]
        return False

    def _find_marker(self, buf: str) -> tuple[int, str | None]:
        best, found = -1, None
        for marker in self._markers:
            i = buf.find(marker)
            if i >= 0 and (best < 0 or i < best or (i == best and found is not None and len(marker) > len(found))):
                best, found = i, marker
        return best, found

    def _partial_suffix(self, buf: str) -> int:
        longest = 0
        for marker in self._markers:
            for n in range(min(len(marker) - 1, len(buf)), longest, -1):
                if buf.endswith(marker[:n]):
                    longest = n
                    break
        return longest

    # calls ----------------------------------------------------------------------------------------------------

    def _calls_step(self, out: list[str], calls: list[ToolCall], final: bool) -> bool:
        buf = self._buf
        # Between calls, separators; after a call, also the stray closing brackets models write (Qwen's extra
        # "}"), which Ollama's parser drops too.
        noise = " \t\r\n,;}]" if self._called else " \t\r\n,;"
        skip = 0
        while skip < len(buf) and buf[skip] in noise:
            skip += 1
        if skip:
            self._pending += buf[:skip]
            self._buf = buf = buf[skip:]
        if not buf:
            if final:
                self._leave_calls(out)
            return False
        for closer in self._closers:
            if buf.startswith(closer):
                self._pending += closer
                self._buf = buf[len(closer) :]
                self._expect_name = False
                return True
        for opener in self._openers:
            if buf.startswith(opener):
                self._pending += opener
                self._pending_marker = True
                self._buf = buf[len(opener) :]
                self._expect_name = opener == MISTRAL_OPEN
                return True
        if not final and any(w.startswith(buf) for w in self._waits):
            return False
        if buf[0] in "{[":
            return self._json_call(out, calls, final)
        if buf.startswith(XML_OPEN):
            return self._xml_call(out, calls, final)
        if buf.startswith(DS_CALL_BEGIN):
            return self._deepseek_call(out, calls, final)
        if self._expect_name:
            return self._mistral_call(out, calls, final)
        self._leave_calls(out)
        return True

    def _json_call(self, out: list[str], calls: list[ToolCall], final: bool) -> bool:
        end = _scan_json(self._buf)
        if end is None:
            if not final:
                return False
            self._fail(out, len(self._buf))
            return True
        if end < 0:
            self._fail(out, -end)
            return True
        found = self._calls_from(_loads(self._buf[:end]))
        if found is None:
            self._fail(out, end)
        else:
            self._found(calls, found, end)
        return True

    def _xml_call(self, out: list[str], calls: list[ToolCall], final: bool) -> bool:
        head = self._buf[len(XML_OPEN) :]
        gt = head.find(">")
        name = head[:gt] if gt >= 0 else head
        if (gt >= 0 and name.strip() not in self._tools) or "\n" in name or len(name) > _MAX_NAME:
            self._fail(out, len(XML_OPEN))
            return True
        end = self._buf.find(XML_CLOSE)
        if end < 0 and not final:
            return False
        consumed = end + len(XML_CLOSE) if end >= 0 else len(self._buf)
        found = self._parse_xml(self._buf[:consumed])
        if found is None:
            self._fail(out, consumed)
        else:
            self._found(calls, [found], consumed)
        return True

    def _parse_xml(self, raw: str) -> tuple[str, dict[str, Any]] | None:
        m = re.match(r"<function=([^>\n]+)>(.*?)(?:</function>)?\s*$", raw, re.S)
        if not m:
            return None
        name = m.group(1).strip()
        fn = self._tools.get(name)
        if fn is None:
            return None
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, Mapping) else None
        props = props if isinstance(props, Mapping) else {}
        arguments: dict[str, Any] = {}
        for pm in re.finditer(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", m.group(2), re.S):
            key = pm.group(1).strip()
            arguments[key] = _typed_value(_strip_one_newline(pm.group(2)), props.get(key))
        return name, arguments

    def _deepseek_call(self, out: list[str], calls: list[ToolCall], final: bool) -> bool:
        buf = self._buf
        begin = next(b for b in DS_CALL_BEGIN if buf.startswith(b))
        ends = [(i, e) for e in DS_CALL_END + DS_CALLS_END if (i := buf.find(e, len(begin))) >= 0]
        if not ends:
            if not final:
                return False
            end, end_tag = len(buf), ""
        else:
            end, end_tag = min(ends)
        consumed = end + (len(end_tag) if end_tag in DS_CALL_END else 0)
        found = self._parse_deepseek(buf[len(begin) : end])
        if found is None:
            self._fail(out, consumed)
        else:
            self._found(calls, [found], consumed)
        return True

    def _parse_deepseek(self, segment: str) -> tuple[str, dict[str, Any]] | None:
        sep = next((s for s in DS_SEP if s in segment), None)
        if sep is None:
            return None
        left, right = segment.split(sep, 1)
        left = left.strip()
        if left in ("", "function"):
            first, _, rest = right.lstrip().partition("\n")
            name, args_text = first.strip(), rest
            if "```" in name:
                name, _, tail = name.partition("```")
                name, args_text = name.strip(), "```" + tail + "\n" + rest
        else:
            name, args_text = left, right
        if name not in self._tools:
            return None
        text = args_text.strip()
        fence = re.fullmatch(r"```[A-Za-z]*\s*(.*?)\s*```", text, re.S)
        if fence:
            text = fence.group(1)
        arguments = _as_arguments(text)
        return None if arguments is None else (name, arguments)

    def _mistral_call(self, out: list[str], calls: list[ToolCall], final: bool) -> bool:
        buf = self._buf
        idx = buf.find(MISTRAL_ARGS)
        head = buf if idx < 0 else buf[:idx]
        name = head.split(MISTRAL_CALL_ID, 1)[0]
        if idx < 0:
            if MISTRAL_CALL_ID not in head:
                for tag in (MISTRAL_ARGS, MISTRAL_CALL_ID):
                    cut = next((n for n in range(len(tag) - 1, 0, -1) if name.endswith(tag[:n])), 0)
                    if cut:
                        name = name[:-cut]
                        break
            if final or len(head) > _MAX_NAME + 64 or any(c in name for c in _SPACE + "{[<"):
                self._leave_calls(out)
                return True
            return False
        if name not in self._tools:
            self._leave_calls(out)
            return True
        rest = buf[idx + len(MISTRAL_ARGS) :]
        body = rest.lstrip(_SPACE)
        start = len(buf) - len(body)
        if not body:
            if final:
                self._fail(out, len(buf))
                return True
            return False
        if body[0] != "{":
            self._fail(out, start)
            return True
        end = _scan_json(body)
        if end is None:
            if final:
                self._fail(out, len(buf))
                return True
            return False
        if end < 0:
            self._fail(out, start - end)
            return True
        arguments = _as_arguments(_loads(body[:end]))
        if arguments is None:
            self._fail(out, start + end)
        else:
            self._found(calls, [(name, arguments)], start + end)
        return True

    def _calls_from(self, value: Any) -> list[tuple[str, dict[str, Any]]] | None:
        items = value if isinstance(value, list) else [value]
        if not items:
            return None
        found = []
        for item in items:
            call = self._call_from(item)
            if call is None:
                return None
            found.append(call)
        return found

    def _call_from(self, obj: Any) -> tuple[str, dict[str, Any]] | None:
        if not isinstance(obj, Mapping):
            return None
        fn: Mapping[str, Any] = obj
        inner = obj.get("function")
        if isinstance(inner, Mapping):
            fn = inner
        name = fn.get("name", fn.get("tool_name"))
        if name is None and isinstance(inner, str):
            name = inner
        if isinstance(name, str):
            if name not in self._tools:
                return None
            raw_args = next(
                (src[k] for src in (fn, obj) for k in ("arguments", "parameters", "args", "input") if k in src), None
            )
            arguments = _as_arguments(raw_args)
            return None if arguments is None else (name, arguments)
        if len(obj) == 1:
            key, value = next(iter(obj.items()))
            if key in self._tools and isinstance(value, Mapping):
                return str(key), {str(k): v for k, v in value.items()}
        return None


def parse_tool_calls(text: str, tools: Sequence[Any], *, prefix: str | None = None) -> tuple[str, list[ToolCall]]:
    """Split complete output into (content, tool calls)."""
    parser = ToolCallParser(tools, prefix=prefix)
    content, calls = parser.feed(text)
    more_content, more_calls = parser.finish()
    return content + more_content, calls + more_calls


class ChatOutputParser:
    """A chat reply's stream split three ways: `feed(text) -> (thinking, content, calls)`, then `finish()`.

    Thinking is split off first (when `thinking_tags` are given), then the remaining content goes
    through a `ToolCallParser` (when `tools` are given) — the order Ollama applies them in.
    """

    def __init__(
        self,
        *,
        tools: Sequence[Any] | None = None,
        tool_prefix: str | None = None,
        thinking_tags: tuple[str, str] | None = None,
        starts_inside: bool = False,
    ) -> None:
        self._thinking = (
            ThinkingParser(thinking_tags[0], thinking_tags[1], starts_inside=starts_inside) if thinking_tags else None
        )
        self._tools = ToolCallParser(tools, prefix=tool_prefix) if tools else None

    def feed(self, text: str) -> tuple[str, str, list[ToolCall]]:
        thinking, content = self._thinking.feed(text) if self._thinking else ("", text)
        if self._tools is None:
            return thinking, content, []
        content, calls = self._tools.feed(content)
        return thinking, content, calls

    def finish(self) -> tuple[str, str, list[ToolCall]]:
        thinking, content = self._thinking.finish() if self._thinking else ("", "")
        if self._tools is None:
            return thinking, content, []
        content, calls = self._tools.feed(content)
        more, more_calls = self._tools.finish()
        return thinking, content + more, calls + more_calls
