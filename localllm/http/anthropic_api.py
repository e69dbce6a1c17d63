"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``), as Ollama serves it.

A request becomes one `ChatRequest`: ``system`` a system message, content blocks text, images,
tool calls (``tool_use``) and tool messages (``tool_result``), ``max_tokens`` ``num_predict``,
``thinking`` ``think``. The engine's chunks become content blocks (``thinking``, ``text``,
``tool_use``) or, streamed, Anthropic's named server-sent events. Errors are
``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..request import ChatRequest
from ..types import ChatResponse, ToolCall
from .common import (
    JSON,
    APIError,
    DisconnectAware,
    EventStream,
    Fields,
    Put,
    dumps,
    error_boundary,
    error_message,
    headers_for,
    pump,
    random_id,
    status_for,
    tool_result,
)
from .ollama_api import engine_of, model_to_serve, read_request

__all__ = ["anthropic_error", "routes"]


# --------------------------------------------------------------------------- errors

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def _error_body(exc: BaseException) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status_for(exc), "api_error")
    return {"type": "error", "error": {"type": kind, "message": error_message(exc)}}


def anthropic_error(exc: BaseException) -> Response:
    return JSON(_error_body(exc), status_code=status_for(exc), headers=headers_for(exc))


def _event(item: dict[str, Any]) -> bytes:
    return f"event: {item['type']}\ndata: {dumps(item)}\n\n".encode()


def _event_error(exc: BaseException) -> bytes:
    return _event(_error_body(exc))


def _sse(produce: Callable[[Put], Awaitable[None]]) -> EventStream:
    return EventStream(
        produce, encode=_event, encode_error=_event_error, on_error=anthropic_error, media_type="text/event-stream"
    )


#: Answers errors raised while reading and checking the request in Anthropic's shape.
endpoint = error_boundary(anthropic_error)


# --------------------------------------------------------------------------- request translation


def _bad(field: str, problem: str) -> APIError:
    return APIError(400, f"invalid value for '{field}': {problem}", param=field)


def _system(fields: Fields) -> str | None:
    value = fields.data.get("system")
    if value is None or isinstance(value, str):
        return value or None
    if not isinstance(value, list):
        raise _bad("system", "expected a string or an array of text blocks")
    texts = []
    for index, block in enumerate(value):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise _bad(f"system[{index}]", "expected a text block")
        texts.append(block["text"])
    return "".join(texts) or None


def _image(block: dict[str, Any], where: str) -> str:
    source = block.get("source")
    if not isinstance(source, dict):
        raise _bad(where, "an image block needs a 'source'")
    if source.get("type") != "base64":
        raise _bad(where, f"image source type {source.get('type')!r} is not supported; send the image as base64")
    data = source.get("data")
    if not isinstance(data, str) or not data:
        raise _bad(where, "an image source needs base64 'data'")
    return data


def _tool_result(block: dict[str, Any], where: str) -> tuple[str, list[str]]:
    """The text and images a ``tool_result`` block carries (its content: a string or text and image blocks)."""
    content = block.get("content")
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list):
        raise _bad(f"{where}.content", "expected a string or an array of blocks")
    texts, images = [], []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image":
            images.append(_image(part, f"{where}.content[{index}]"))
        else:
            raise _bad(f"{where}.content[{index}]", "expected a text or image block")
    return "".join(texts), images


def _message(message: Any, index: int, names_by_id: dict[str, str]) -> list[dict[str, Any]]:
    """One Anthropic message as localllm messages: the tool results it answers with first (as Ollama orders
    them), then its text, images, thinking and tool calls."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _bad(where, "expected an object")
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise _bad(f"{where}.role", f"expected 'user' or 'assistant', got {role!r}")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _bad(f"{where}.content", "expected a string or an array of content blocks")
    texts: list[str] = []
    images: list[str] = []
    calls: list[dict[str, Any]] = []
    thinking = ""
    results: list[dict[str, Any]] = []
    for position, block in enumerate(content):
        place = f"{where}.content[{position}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise _bad(place, "a text block needs 'text'")
            texts.append(block["text"])
        elif kind == "image":
            images.append(_image(block, place))
        elif kind == "thinking":
            if isinstance(block.get("thinking"), str):
                thinking = block["thinking"]
        elif kind == "redacted_thinking":
            continue  # another provider's encrypted reasoning: nothing a local model can read
        elif kind == "tool_use":
            call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
            if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name:
                raise _bad(place, "a tool_use block needs an 'id' and a 'name'")
            if not isinstance(arguments, dict):
                raise _bad(f"{place}.input", "expected an object")
            names_by_id[call_id] = name
            calls.append({"id": call_id, "function": {"name": name, "arguments": arguments, "index": len(calls)}})
        elif kind == "tool_result":
            answered = block.get("tool_use_id")
            if not isinstance(answered, str) or not answered:
                raise _bad(place, "a tool_result block needs a 'tool_use_id'")
            text, result_images = _tool_result(block, place)
            results.append(tool_result(text, answered, names_by_id.get(answered), result_images))
        else:
            raise _bad(place, f"content block type {kind!r} is not supported")
    out = results if role == "user" else []
    if texts or images or calls or thinking or not results:
        entry: dict[str, Any] = {"role": role, "content": "".join(texts)}
        if images:
            entry["images"] = images
        if calls:
            entry["tool_calls"] = calls
        if thinking:
            entry["thinking"] = thinking
        out.append(entry)
    if role != "user":
        out.extend(results)
    return out


def _messages(fields: Fields) -> list[dict[str, Any]]:
    raw = fields.array("messages")
    if not raw:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    out: list[dict[str, Any]] = []
    system = _system(fields)
    if system:
        out.append({"role": "system", "content": system})
    names_by_id: dict[str, str] = {}
    for index, message in enumerate(raw):
        out.extend(_message(message, index, names_by_id))
    return out


def _tools(fields: Fields) -> list[dict[str, Any]] | None:
    raw = fields.array("tools")
    if not raw:
        return None
    tools = []
    for index, tool in enumerate(raw):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise _bad(where, "a tool needs a 'name'")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise _bad(f"{where}.type", f"server tool {kind!r} is not supported; define the tool with an input_schema")
        schema = tool.get("input_schema", {"type": "object", "properties": {}})
        if not isinstance(schema, dict):
            raise _bad(f"{where}.input_schema", "expected a JSON schema object")
        description = tool.get("description", "")
        if not isinstance(description, str):
            raise _bad(f"{where}.description", "expected a string")
        function = {"name": tool["name"], "description": description, "parameters": schema}
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(fields: Fields) -> str | dict[str, Any] | None:
    value = fields.mapping("tool_choice")
    if value is None:
        return None
    kind = value.get("type")
    if kind in ("auto", "none"):
        return str(kind)
    if kind == "any":
        return "required"
    if kind == "tool":
        name = value.get("name")
        if not isinstance(name, str) or not name:
            raise _bad("tool_choice.name", "tool_choice of type 'tool' needs the tool's 'name'")
        return {"type": "function", "function": {"name": name}}
    raise _bad("tool_choice.type", f"expected 'auto', 'any', 'tool' or 'none', got {kind!r}")


_EFFORTS = ("low", "medium", "high", "max")


def _think(fields: Fields) -> bool | str | None:
    """``thinking`` (enabled or disabled; its budget is not kept to), else ``output_config.effort``, as Ollama."""
    value = fields.mapping("thinking")
    if value is not None:
        kind = value.get("type")
        if kind == "enabled":
            return True
        if kind == "disabled":
            return False
        raise _bad("thinking.type", f"expected 'enabled' or 'disabled', got {kind!r}")
    config = fields.mapping("output_config")
    effort = config.get("effort") if config else None
    if effort is None:
        return None
    effort = {"xhigh": "high"}.get(effort, effort)
    if effort not in _EFFORTS:
        raise _bad("output_config.effort", f"expected one of {', '.join(_EFFORTS)}, got {effort!r}")
    return str(effort)


def _options(fields: Fields, *, counting: bool) -> dict[str, Any]:
    options: dict[str, Any] = {}
    max_tokens = fields.integer("max_tokens")
    if not counting:
        if max_tokens is None:
            raise APIError(400, "'max_tokens' is required", param="max_tokens")
        if max_tokens < 1:
            raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
        options["num_predict"] = max_tokens
    for name in ("temperature", "top_p"):
        value = fields.number(name)
        if value is not None:
            options[name] = value
    top_k = fields.integer("top_k")
    if top_k is not None:
        options["top_k"] = top_k
    stop = fields.texts("stop_sequences")
    if stop:
        options["stop"] = stop
    return options


async def _chat_request(request: Request, fields: Fields, *, counting: bool = False) -> ChatRequest:
    model = fields.text("model")
    if not model:
        raise APIError(400, "'model' is required", param="model")
    model = await model_to_serve(request, model)
    messages = _messages(fields)
    tools = _tools(fields)
    options = _options(fields, counting=counting)
    if counting:
        options["num_predict"] = 1  # the count comes from evaluating the prompt; one token is the least a run makes
    return ChatRequest(
        model,
        messages,
        tools=tools,
        tool_choice=_tool_choice(fields) if tools else None,
        think=_think(fields),
        options=options,
    )


# --------------------------------------------------------------------------- response translation


def _stop_reason(done_reason: str | None, tool_calls: bool) -> str:
    # The engine ends on a stop sequence as on the end of turn ("stop"), so, as Ollama's, both are end_turn.
    if tool_calls:
        return "tool_use"
    return "max_tokens" if done_reason == "length" else "end_turn"


def _usage(response: ChatResponse) -> dict[str, int]:
    """Anthropic counts the prompt's tokens read from the cache apart from the rest of its input."""
    prompt = int(response.prompt_eval_count or 0)
    cached = min(int(response.prompt_cached_count or 0), prompt)
    return {
        "input_tokens": prompt - cached,
        "output_tokens": int(response.eval_count or 0),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": call.id or random_id("toolu"),
        "name": call.function.name,
        "input": dict(call.function.arguments),
    }


def _message_json(message_id: str, model: str, reply: ChatResponse) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if reply.message.thinking:
        content.append({"type": "thinking", "thinking": reply.message.thinking, "signature": ""})
    if reply.message.content:
        content.append({"type": "text", "text": reply.message.content})
    calls = reply.message.tool_calls or ()
    content.extend(_tool_use(call) for call in calls)
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _stop_reason(reply.done_reason, bool(calls)),
        "stop_sequence": None,
        "usage": _usage(reply),
    }


class _Blocks:
    """Turns the engine's chunks into Anthropic's stream events, opening and closing content blocks."""

    def __init__(self, message_id: str, model: str) -> None:
        self.message_id = message_id
        self.model = model
        self.started = False
        self.index = 0
        self.open: str | None = None  # the type of the content block open now
        self.calls = 0

    def _start(self, kind: str, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._stop()
        self.open = kind
        events.append({"type": "content_block_start", "index": self.index, "content_block": block})
        return events

    def _stop(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        self.open = None
        self.index += 1
        return [{"type": "content_block_stop", "index": self.index - 1}]

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}

    def convert(self, chunk: ChatResponse) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if not self.started:
            self.started = True
            usage = {"input_tokens": 0, "output_tokens": 0}  # the engine counts the prompt by the end
            opening: dict[str, Any] = {
                "id": self.message_id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": usage,
            }
            events += [{"type": "message_start", "message": opening}, {"type": "ping"}]
        message = chunk.message
        if message.thinking:
            if self.open != "thinking":
                events += self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            events.append(self._delta({"type": "thinking_delta", "thinking": message.thinking}))
        if message.content:
            if self.open != "text":
                events += self._start("text", {"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": message.content}))
        for call in message.tool_calls or ():
            block = _tool_use(call)
            arguments = json.dumps(block.pop("input"), ensure_ascii=False)
            events += self._start("tool_use", {**block, "input": {}})
            events.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
            events += self._stop()
            self.calls += 1
        if chunk.done:
            events += self._stop()
            delta = {"stop_reason": _stop_reason(chunk.done_reason, self.calls > 0), "stop_sequence": None}
            events.append({"type": "message_delta", "delta": delta, "usage": _usage(chunk)})
            events.append({"type": "message_stop"})
        return events


# --------------------------------------------------------------------------- the routes


@endpoint
async def messages(request: Request) -> Response:
    fields = await read_request(request)
    chat_request = await _chat_request(request, fields)
    stream = fields.flag("stream", False)
    model = chat_request.model
    engine = engine_of(request)
    message_id = random_id("msg")

    if not stream:

        async def compute() -> Response:
            reply = await engine.send(chat_request)
            return JSON(_message_json(message_id, model, reply))

        return DisconnectAware(compute, anthropic_error)

    async def produce(put: Put) -> None:
        await pump(engine.send(chat_request, stream=True), put, _Blocks(message_id, model).convert)

    return _sse(produce)


@endpoint
async def count_tokens(request: Request) -> Response:
    """The prompt's tokens, as the engine counts them: it evaluates the prompt (one token generated, not shown)."""
    fields = await read_request(request)
    chat_request = await _chat_request(request, fields, counting=True)
    engine = engine_of(request)

    async def compute() -> Response:
        reply = await engine.send(chat_request)
        return JSON({"input_tokens": int(reply.prompt_eval_count or 0)})

    return DisconnectAware(compute, anthropic_error)


def routes() -> list[Route]:
    return [
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
    ]
