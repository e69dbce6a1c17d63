"""OpenAI's Responses API (``POST /v1/responses``), the front door of Codex and the OpenAI Agents SDK.

A thin adapter: the request becomes a `ChatRequest` (``input`` items as messages, ``instructions`` as
the system message, function tools, ``text.format`` as the format, ``reasoning.effort`` as the think
level, ``max_output_tokens`` as ``num_predict``), and the engine's chunks become a response object or,
streamed, the API's typed server-sent events. Nothing is stored: ``previous_response_id`` and
``conversation`` are refused. Errors have the shape of the other ``/v1`` routes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..request import ChatRequest
from ..types import ToolCall
from .common import (
    JSON,
    APIError,
    DisconnectAware,
    EventStream,
    Fields,
    Put,
    dumps,
    error_message,
    json_text,
    pump,
    random_id,
    tool_result,
)
from .ollama_api import engine_of, model_to_serve, read_request
from .openai_api import endpoint, input_audio, openai_error, reasoning

__all__ = ["routes"]

#: Fields that would need responses kept on the server, which it does not do.
STATEFUL_FIELDS = ("previous_response_id", "conversation")


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param)


# --------------------------------------------------------------------------- request translation


def _image(part: dict[str, Any], where: str) -> str:
    url = part.get("image_url")
    if not isinstance(url, str) or not url:
        raise _bad(f"{where}: an input_image needs an 'image_url' (file ids are not supported)", "input")
    if not url.startswith("data:"):
        raise _bad(f"{where}: image URLs are not supported; send the image as a base64 data URL", "input")
    header, _, data = url.partition(",")
    if ";base64" not in header:
        raise _bad(f"{where}: image data URLs must be base64 encoded", "input")
    return data


def _content(value: Any, where: str) -> tuple[str, list[str]]:
    """The text (parts joined) and images of an item's ``content`` (or a function call's ``output``)."""
    if value is None:
        return "", []
    if isinstance(value, str):
        return value, []
    if not isinstance(value, list):
        raise _bad(f"{where} must be a string or an array of content parts", "input")
    texts: list[str] = []
    images: list[str] = []
    for index, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        here = f"{where}[{index}]"
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind == "input_image":
            images.append(_image(part, here))
        elif kind == "input_audio":
            images.append(input_audio(part, here, "input"))
        elif kind == "input_file":
            raise _bad(f"{here}: file inputs are not supported; send the text as input_text", "input")
        else:
            raise _bad(f"{here} has an unsupported content part type {kind!r}", "input")
    return "".join(texts), images


def _reasoning_text(item: dict[str, Any]) -> str:
    """The thinking a reasoning item carries back: its plain ``encrypted_content``, or its summary texts."""
    content = item.get("encrypted_content")
    if isinstance(content, str) and content:
        return content
    summary = item.get("summary") or []
    return "".join(part.get("text", "") for part in summary if isinstance(part, dict))


def input_messages(fields: Fields) -> list[dict[str, Any]]:
    """``instructions`` and ``input`` as Ollama messages; a function call joins the assistant turn before it."""
    messages: list[dict[str, Any]] = []
    instructions = fields.text("instructions")
    if instructions:
        messages.append({"role": "system", "content": instructions})
    raw = fields.data.get("input")
    if isinstance(raw, str):
        messages.append({"role": "user", "content": raw})
        return messages
    if not isinstance(raw, list) or not raw:
        raise _bad("'input' must be a string or a non-empty array of input items", "input")
    names_by_id: dict[str, str] = {}
    thinking = ""  # a reasoning item's text, for the assistant turn after it
    for index, item in enumerate(raw):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise _bad(f"{where} must be an object", "input")
        kind = item.get("type") or ("message" if item.get("role") else None)
        if kind == "reasoning":
            thinking += _reasoning_text(item)
        elif kind == "message":
            role = item.get("role")
            role = "system" if role == "developer" else role
            if role not in ("system", "user", "assistant"):
                raise _bad(f"{where} has an unsupported role {role!r}", "input")
            text, images = _content(item.get("content"), f"{where}.content")
            message: dict[str, Any] = {"role": role, "content": text}
            if images:
                message["images"] = images
            if role == "assistant" and thinking:
                message["thinking"], thinking = thinking, ""
            messages.append(message)
        elif kind == "function_call":
            name, call_id = item.get("name"), item.get("call_id") or ""
            if not isinstance(name, str) or not name or not isinstance(call_id, str):
                raise _bad(f"{where}: a function_call needs a 'name' and a 'call_id'", "input")
            arguments = item.get("arguments") or ""
            if not isinstance(arguments, str):
                raise _bad(f"{where}.arguments must be a string of JSON", "input")
            parsed = json_text(arguments, f"{where}.arguments") if arguments.strip() else {}
            if not isinstance(parsed, dict):
                raise _bad(f"{where}.arguments must be a JSON object", "input")
            call = {"id": call_id, "function": {"name": name, "arguments": parsed}}
            names_by_id[call_id] = name
            if messages and messages[-1]["role"] == "assistant":
                turn = messages[-1]
            else:
                turn = {"role": "assistant", "content": ""}
                messages.append(turn)
            turn.setdefault("tool_calls", []).append(call)
            if thinking:
                turn["thinking"], thinking = thinking, ""
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _bad(f"{where}: a function_call_output needs the 'call_id' it answers", "input")
            text, images = _content(item.get("output"), f"{where}.output")
            messages.append(tool_result(text, call_id, names_by_id.get(call_id), images))
        elif kind == "item_reference":
            raise _bad(f"{where}: item references are not supported, as responses are not stored", "input")
        else:
            raise _bad(f"{where} has an unsupported type {kind!r}", "input")
    if thinking:
        messages.append({"role": "assistant", "content": "", "thinking": thinking})
    return messages


def function_tools(fields: Fields) -> list[dict[str, Any]]:
    """The Responses API's function tools (flat: name, description, parameters) as chat tools."""
    tools = []
    for index, tool in enumerate(fields.array("tools") or ()):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise _bad(f"tools[{index}]: only function tools are supported, got {kind!r}", "tools")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{index}] needs a 'name'", "tools")
        function: dict[str, Any] = {"name": name, "description": tool.get("description") or ""}
        parameters = tool.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _bad(f"tools[{index}].parameters must be a JSON schema object", "tools")
        function["parameters"] = parameters or {"type": "object", "properties": {}}
        tools.append({"type": "function", "function": function})
    return tools


def tool_choice(fields: Fields, tools: Sequence[dict[str, Any]]) -> str | dict[str, Any] | None:
    """``auto``, ``none``, ``required`` or ``{"type": "function", "name"}`` (the engine checks the name)."""
    value = fields.data.get("tool_choice")
    if value is None or not tools:
        return None
    if value in ("auto", "none", "required"):
        return str(value)
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        return {"type": "function", "name": value["name"]}
    message = "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}"
    raise _bad(message, "tool_choice")


def text_format(fields: Fields) -> Any:
    text = fields.mapping("text")
    spec = text.get("format") if text else None
    if spec is None:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise _bad("text.format json_schema needs a 'schema' object", "text.format")
        return schema
    raise _bad(f"unsupported text.format type {kind!r}: use 'text', 'json_object' or 'json_schema'", "text.format")


def sampling_options(fields: Fields) -> dict[str, Any]:
    options: dict[str, Any] = {
        "temperature": fields.number("temperature", 1.0),
        "top_p": fields.number("top_p", 1.0),
    }
    limit = fields.integer("max_output_tokens")
    if limit is not None:
        if limit < 1:
            raise _bad("max_output_tokens must be at least 1", "max_output_tokens")
        options["num_predict"] = limit
    return options


def refuse_unsupported(fields: Fields) -> None:
    for name in STATEFUL_FIELDS:
        if fields.has(name):
            raise _bad(f"'{name}' is not supported: responses are not stored; send the whole conversation", name)
    if fields.flag("background", False):
        raise _bad("background responses are not supported", "background")


# --------------------------------------------------------------------------- rendering


def _arguments(call: ToolCall) -> str:
    return json.dumps(dict(call.function.arguments), ensure_ascii=False)


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseBuilder:
    """Turns the engine's chunks into output items and the Responses API's typed events, in order.

    The same builder renders a whole reply (one chunk) and a stream, so both give the same output. Each
    kind of output (reasoning, text) is one item while it lasts; a function call is an item of its own.
    """

    def __init__(self, model: str, echo: dict[str, Any]) -> None:
        self.id = random_id("resp")
        self.model = model
        self.created_at = int(time.time())
        self.echo = echo
        self.sequence = 0
        self.started = False
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the reasoning or message item being written
        self.text = ""

    def event(self, kind: str, **data: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return event

    def response(self, status: str, usage: dict[str, Any] | None = None, reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": int(time.time()) if status != "in_progress" else None,
            "status": status,
            "incomplete_details": {"reason": reason} if reason else None,
            "error": None,
            "model": self.model,
            "output": list(self.output) if status != "in_progress" else [],
            "previous_response_id": None,
            "store": False,
            "parallel_tool_calls": True,
            "usage": usage,
            "metadata": {},
            **self.echo,
        }

    def _close(self) -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        index = len(self.output)
        events = []
        if item["type"] == "reasoning":
            item["summary"] = [{"type": "summary_text", "text": self.text}]
            item["encrypted_content"] = self.text  # plain text, which a client sends back as is
            events.append(
                self.event(
                    "response.reasoning_summary_text.done",
                    item_id=item["id"],
                    output_index=index,
                    summary_index=0,
                    text=self.text,
                )
            )
        else:
            part = _output_text(self.text)
            item["content"] = [part]
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            events.append(self.event("response.output_text.done", **where, text=self.text, logprobs=[]))
            events.append(self.event("response.content_part.done", **where, part=part))
        item["status"] = "completed"
        self.output.append(item)
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        return events

    def _write(self, kind: str, delta: str) -> list[dict[str, Any]]:
        events = []
        if self.open is None or self.open["type"] != kind:
            events += self._close()
            self.text = ""
            index = len(self.output)
            if kind == "reasoning":
                self.open = {"id": random_id("rs"), "type": "reasoning", "summary": []}
                events.append(self.event("response.output_item.added", output_index=index, item=dict(self.open)))
                part = {"type": "summary_text", "text": ""}
                where = {"item_id": self.open["id"], "output_index": index, "summary_index": 0}
                events.append(self.event("response.reasoning_summary_part.added", **where, part=part))
            else:
                self.open = {"id": random_id("msg"), "type": "message", "status": "in_progress", "role": "assistant"}
                events.append(
                    self.event("response.output_item.added", output_index=index, item={**self.open, "content": []})
                )
                where = {"item_id": self.open["id"], "output_index": index, "content_index": 0}
                events.append(self.event("response.content_part.added", **where, part=_output_text("")))
        self.text += delta
        index = len(self.output)
        if kind == "reasoning":
            where = {"item_id": self.open["id"], "output_index": index, "summary_index": 0}
            events.append(self.event("response.reasoning_summary_text.delta", **where, delta=delta))
        else:
            where = {"item_id": self.open["id"], "output_index": index, "content_index": 0}
            events.append(self.event("response.output_text.delta", **where, delta=delta, logprobs=[]))
        return events

    def _call(self, call: ToolCall) -> list[dict[str, Any]]:
        events = self._close()
        index = len(self.output)
        arguments = _arguments(call)
        item = {
            "id": random_id("fc"),
            "type": "function_call",
            "status": "in_progress",
            "call_id": call.id or random_id("call"),
            "name": call.function.name,
            "arguments": "",
        }
        events.append(self.event("response.output_item.added", output_index=index, item=dict(item)))
        where = {"item_id": item["id"], "output_index": index}
        events.append(self.event("response.function_call_arguments.delta", **where, delta=arguments))
        events.append(self.event("response.function_call_arguments.done", **where, arguments=arguments))
        item.update(status="completed", arguments=arguments)
        self.output.append(item)
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        return events

    def start(self) -> list[dict[str, Any]]:
        self.started = True
        created = self.event("response.created", response=self.response("in_progress"))
        return [created, self.event("response.in_progress", response=self.response("in_progress"))]

    def feed(self, chunk: Any) -> list[dict[str, Any]]:
        """The events one chunk of the engine's reply makes (the last one ends the response)."""
        events = [] if self.started else self.start()
        message = chunk.message
        if message.thinking:
            events += self._write("reasoning", message.thinking)
        if message.content:
            events += self._write("message", message.content)
        for call in message.tool_calls or ():
            events += self._call(call if isinstance(call, ToolCall) else ToolCall.from_dict(call))
        if chunk.done:
            events += self.finish(chunk)
        return events

    def finish(self, last: Any) -> list[dict[str, Any]]:
        if not self.output and self.open is None:
            self._write("message", "")  # an empty answer is still a message
        events = self._close()
        prompt = int(last.prompt_eval_count or 0)
        completion = int(last.eval_count or 0)
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": int(last.prompt_cached_count or 0)},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
        if last.done_reason == "length":
            final = self.response("incomplete", usage, reason="max_output_tokens")
            return [*events, self.event("response.incomplete", response=final)]
        return [*events, self.event("response.completed", response=self.response("completed", usage))]


def _echo(fields: Fields, chat_request: ChatRequest) -> dict[str, Any]:
    """The request's settings as a response repeats them."""
    options = chat_request.options or {}
    text = fields.mapping("text") or {}
    tools = [
        {key: tool.get(key) for key in ("type", "name", "description", "parameters", "strict")}
        for tool in fields.array("tools") or ()
    ]
    return {
        "instructions": fields.text("instructions"),
        "max_output_tokens": fields.integer("max_output_tokens"),
        "reasoning": fields.mapping("reasoning"),
        "temperature": options.get("temperature"),
        "top_p": options.get("top_p"),
        "text": {"format": text.get("format") or {"type": "text"}},
        "tool_choice": fields.data.get("tool_choice") or "auto",
        "tools": tools,
        "truncation": fields.text("truncation", "disabled"),
    }


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {dumps(event)}\n\n".encode()


# --------------------------------------------------------------------------- /v1/responses


@endpoint
async def create_response(request: Request) -> Response:
    fields = await read_request(request)
    refuse_unsupported(fields)
    model = fields.text("model")
    if not model:
        raise _bad("'model' is required", "model")
    model = await model_to_serve(request, str(model))
    tools = function_tools(fields)
    chat_request = ChatRequest(
        model,
        input_messages(fields),
        options=sampling_options(fields),
        format=text_format(fields),
        tools=tools,
        think=reasoning(fields),
        tool_choice=tool_choice(fields, tools),
    )
    builder = ResponseBuilder(model, _echo(fields, chat_request))
    engine = engine_of(request)

    if not fields.flag("stream", False):

        async def compute() -> Response:
            reply = await engine.send(chat_request)
            events = builder.feed(reply)
            return JSON(events[-1]["response"])

        return DisconnectAware(compute, openai_error)

    def encode_error(exc: BaseException) -> bytes:
        error = openai_error(exc)
        code = {404: "model_not_found", 503: "overloaded"}.get(error.status_code, "server_error")
        return _sse(builder.event("error", code=code, message=error_message(exc), param=None))

    async def produce(put: Put) -> None:
        await pump(engine.send(chat_request, stream=True), put, builder.feed)

    return EventStream(
        produce, encode=_sse, encode_error=encode_error, on_error=openai_error, media_type="text/event-stream"
    )


def routes() -> list[Route]:
    return [Route("/v1/responses", create_response, methods=["POST"])]
