"""The OpenAI-compatible API (``/v1/...``): chat completions, completions, embeddings and models.

Requests are translated into Engine calls with Ollama's options (``max_tokens``
becomes ``num_predict``, ``response_format`` becomes ``format``, ...), and the
answers into OpenAI's objects. Streams are server-sent events ending in
``data: [DONE]``. Errors are ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..request import ChatRequest, EmbedRequest, GenerateRequest
from ..types import Logprob, TokenLogprob, ToolCall
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
    tool_calls,
)
from .ollama_api import engine_of, model_to_serve, read_request

__all__ = ["openai_error", "routes"]


FINGERPRINT = "fp_localllm"


# --------------------------------------------------------------------------- errors


def _error_body(exc: BaseException) -> dict[str, Any]:
    status = status_for(exc)
    kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error"}.get(status)
    if kind is None:
        kind = "server_error" if status == 503 else "api_error"
    param = getattr(exc, "param", None)
    code = getattr(exc, "code", None)
    if code is None:
        code = {404: "model_not_found", 413: "request_too_large", 503: "overloaded"}.get(status)
    return {"error": {"message": error_message(exc), "type": kind, "param": param, "code": code}}


def openai_error(exc: BaseException) -> Response:
    return JSON(_error_body(exc), status_code=status_for(exc), headers=headers_for(exc))


def _sse(item: Any) -> bytes:
    return f"data: {dumps(item)}\n\n".encode()


def _sse_error(exc: BaseException) -> bytes:
    return _sse(_error_body(exc))


def sse(produce: Callable[[Put], Awaitable[None]]) -> EventStream:
    return EventStream(
        produce,
        encode=_sse,
        encode_error=_sse_error,
        on_error=openai_error,
        media_type="text/event-stream",
        trailer=b"data: [DONE]\n\n",
    )


#: Answers errors raised while reading and checking the request in OpenAI's shape.
endpoint = error_boundary(openai_error)


async def _model(request: Request, fields: Fields) -> str:
    model = fields.text("model")
    if not model:
        raise APIError(400, "'model' is required", param="model")
    return await model_to_serve(request, str(model))


# --------------------------------------------------------------------------- request translation


def sampling_options(fields: Fields) -> dict[str, Any]:
    """OpenAI's sampling fields as Ollama options (temperature and top_p default to 1, as OpenAI's do)."""
    options: dict[str, Any] = {
        "temperature": fields.number("temperature", 1.0),
        "top_p": fields.number("top_p", 1.0),
    }
    max_tokens = fields.integer("max_completion_tokens", fields.integer("max_tokens"))
    if max_tokens is not None:
        if max_tokens < 1:
            raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
        options["num_predict"] = max_tokens
    for source, target in (("frequency_penalty", "frequency_penalty"), ("presence_penalty", "presence_penalty")):
        value = fields.number(source)
        if value is not None:
            options[target] = value
    seed = fields.integer("seed")
    if seed is not None:
        options["seed"] = seed
    stop = fields.data.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        options["stop"] = stop
    elif stop is not None:
        raise APIError(400, "invalid value for 'stop': expected a string or an array of strings", param="stop")
    n = fields.integer("n", 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    return options


def response_format(fields: Fields) -> Any:
    value = fields.mapping("response_format")
    if value is None:
        return None
    kind = value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format json_schema needs a 'schema' object", param="response_format")
        return schema
    raise APIError(400, f"unsupported response_format type {kind!r}", param="response_format")


def reasoning(fields: Fields) -> Any:
    effort, field = None, "reasoning.effort"
    value = fields.mapping("reasoning")
    if value is not None:
        effort = value.get("effort")
    if effort is None:
        effort, field = fields.text("reasoning_effort"), "reasoning_effort"
    if effort is None:
        return None
    levels: dict[str, bool | str] = {
        "none": False,
        "minimal": "low",
        "low": "low",
        "medium": "medium",
        "high": "high",
        "xhigh": "max",
        "max": "max",
    }
    if not isinstance(effort, str) or effort not in levels:
        expected = ", ".join(repr(level) for level in levels)
        raise APIError(400, f"invalid value for '{field}': {effort!r} is not one of {expected}", param=field)
    return levels[effort]


def _image(url: Any) -> str:
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str):
        raise APIError(400, "invalid image_url content part", param="messages")
    if url.startswith(("http://", "https://")):
        raise APIError(400, "image URLs are not supported; send the image as a base64 data URL", param="messages")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if ";base64" not in header:
            raise APIError(400, "image data URLs must be base64 encoded", param="messages")
        return data
    return url


def input_audio(part: Any, where: str, param: str = "messages") -> str:
    """An ``input_audio`` part's base64 WAV: carried as the message's images are, and told apart by its content."""
    clip = part.get("input_audio") if isinstance(part, dict) else None
    if not isinstance(clip, dict) or not isinstance(clip.get("data"), str):
        raise APIError(
            400,
            f"{where}: an input_audio part needs 'input_audio': {{'data': <base64>, 'format': 'wav'}}",
            param=param,
        )
    audio_format = clip.get("format")
    if audio_format != "wav":
        raise APIError(
            400, f"{where}: audio format {audio_format!r} is not read here; send audio as WAV (PCM)", param=param
        )
    return str(clip["data"])


def chat_messages(fields: Fields) -> list[dict[str, Any]]:
    """OpenAI messages as Ollama messages: text parts joined, images from data URLs, tool calls and results."""
    raw = fields.array("messages")
    if not raw:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    names_by_id: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{index}] must be an object", param="messages")
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{index}] has an unsupported role {role!r}", param="messages")
        content = message.get("content")
        images: list[str] = []
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url":
                    images.append(_image(part.get("image_url")))
                elif kind == "input_audio":
                    images.append(input_audio(part, f"messages[{index}]"))
                else:
                    raise APIError(400, f"messages[{index}] has an unsupported content part", param="messages")
            text = "\n".join(texts)
        else:
            raise APIError(400, f"messages[{index}].content must be a string or an array", param="messages")
        entry: dict[str, Any] = {"role": role, "content": text}
        if images:
            entry["images"] = images
        if message.get("reasoning") or message.get("reasoning_content"):
            entry["thinking"] = message.get("reasoning") or message.get("reasoning_content")
        calls = message.get("tool_calls")
        if calls:
            converted = tool_calls(calls, f"messages[{index}].tool_calls")
            for call in converted:
                if call["id"]:
                    names_by_id[call["id"]] = call["function"]["name"]
            entry["tool_calls"] = converted
        if role == "tool":
            answered = message.get("tool_call_id")
            if answered:
                entry["tool_call_id"] = str(answered)
            name = message.get("name") or names_by_id.get(str(answered or ""))
            if name:
                entry["tool_name"] = name
        out.append(entry)
    return out


def _tool_calls_json(calls: Any, start: int = 0) -> list[dict[str, Any]]:
    out = []
    for offset, call in enumerate(calls or ()):
        call = call if isinstance(call, ToolCall) else ToolCall.from_dict(call)
        out.append(
            {
                "index": start + offset,
                "id": call.id or f"call_{secrets.token_hex(8)}",
                "type": "function",
                "function": {
                    "name": call.function.name,
                    "arguments": json.dumps(dict(call.function.arguments), ensure_ascii=False),
                },
            }
        )
    return out


def _usage(response: Any) -> dict[str, Any]:
    prompt = int(getattr(response, "prompt_eval_count", None) or 0)
    completion = int(getattr(response, "eval_count", None) or 0)
    cached = int(getattr(response, "prompt_cached_count", None) or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _token_json(scored: TokenLogprob) -> dict[str, Any]:
    return {"token": scored.token, "logprob": scored.logprob, "bytes": list(scored.bytes)}


def _chat_logprobs(logprobs: Sequence[Logprob] | None) -> dict[str, Any]:
    """A chat completion's ``choices[].logprobs``: each token with its ``top_logprobs``."""
    content = [
        {**_token_json(scored), "top_logprobs": [_token_json(top) for top in scored.top_logprobs or ()]}
        for scored in logprobs or ()
    ]
    return {"content": content, "refusal": None}


def _completion_logprobs(logprobs: Sequence[Logprob] | None, offset: int) -> dict[str, Any]:
    """A completion's ``choices[].logprobs`` (OpenAI's legacy shape), for text starting at `offset`."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for scored in logprobs or ():
        out["tokens"].append(scored.token)
        out["token_logprobs"].append(scored.logprob)
        # As OpenAI's, the alternatives always include the sampled token.
        alternatives = {top.token: top.logprob for top in scored.top_logprobs or ()}
        out["top_logprobs"].append({**alternatives, scored.token: scored.logprob})
        out["text_offset"].append(offset)
        offset += len(scored.token)
    return out


def _finish_reason(done_reason: str | None, tool_calls: bool) -> str:
    reason = done_reason or "stop"
    if reason == "stop" and tool_calls:
        return "tool_calls"
    if reason not in ("stop", "length", "tool_calls", "content_filter"):
        return "stop"
    return reason


def _include_usage(fields: Fields) -> bool:
    options = fields.mapping("stream_options")
    return bool(options and options.get("include_usage"))


# --------------------------------------------------------------------------- /v1/chat/completions


@endpoint
async def chat_completions(request: Request) -> Response:
    fields = await read_request(request)
    model = await _model(request, fields)
    messages = chat_messages(fields)
    stream = fields.flag("stream", False)
    include_usage = _include_usage(fields)
    logprobs = fields.flag("logprobs", False)
    tools = fields.array("tools")
    chat_request = ChatRequest(
        model,
        messages,
        options=sampling_options(fields),
        format=response_format(fields),
        tools=tools,
        logprobs=logprobs,
        top_logprobs=fields.integer("top_logprobs", 0),
        think=reasoning(fields),
        tool_choice=fields.data.get("tool_choice") if tools else None,
    )
    engine = engine_of(request)
    completion_id = random_id("chatcmpl", "-")
    created = int(time.time())

    if not stream:

        async def compute() -> Response:
            reply = await engine.send(chat_request)
            calls = _tool_calls_json(reply.message.tool_calls)
            message: dict[str, Any] = {"role": "assistant", "content": reply.message.content}
            if calls:
                message["tool_calls"] = calls
                if not reply.message.content:
                    message["content"] = None
            if reply.message.thinking:
                message["reasoning"] = reply.message.thinking
            return JSON(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "system_fingerprint": FINGERPRINT,
                    "choices": [
                        {
                            "index": 0,
                            "message": message,
                            "finish_reason": _finish_reason(reply.done_reason, bool(calls)),
                            "logprobs": _chat_logprobs(reply.logprobs) if logprobs else None,
                        }
                    ],
                    "usage": _usage(reply),
                }
            )

        return DisconnectAware(compute, openai_error)

    def chunk(
        delta: dict[str, Any], finish_reason: str | None = None, scored: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": scored}],
        }

    async def produce(put: Put) -> None:
        state = {"first": True, "calls": 0}

        def convert(part: Any) -> list[dict[str, Any]]:
            message = part.message
            delta: dict[str, Any] = {}
            if message.thinking:
                delta["reasoning"] = message.thinking
            if message.content:
                delta["content"] = message.content
            if message.tool_calls:
                delta["tool_calls"] = _tool_calls_json(message.tool_calls, state["calls"])
                state["calls"] += len(message.tool_calls)
            if state["first"] and (delta or not part.done):
                state["first"] = False
                delta = {"role": "assistant", "content": "", **delta}
            if logprobs and part.logprobs:  # a chunk may carry logprobs alone, for text a parser holds back
                return [chunk(delta, scored=_chat_logprobs(part.logprobs))]
            return [chunk(delta)] if delta else []

        last = await pump(engine.send(chat_request, stream=True), put, convert)
        if last is None:
            return
        await put(chunk({}, _finish_reason(last.done_reason, state["calls"] > 0)))
        if include_usage:
            usage_chunk = chunk({})
            usage_chunk["choices"] = []
            usage_chunk["usage"] = _usage(last)
            await put(usage_chunk)

    return sse(produce)


# --------------------------------------------------------------------------- /v1/completions


def _prompt(fields: Fields) -> str:
    value = fields.data.get("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, str):
        return value
    raise APIError(400, "'prompt' must be a string (or an array of one string)", param="prompt")


@endpoint
async def completions(request: Request) -> Response:
    fields = await read_request(request)
    model = await _model(request, fields)
    prompt = _prompt(fields)
    stream = fields.flag("stream", False)
    include_usage = _include_usage(fields)
    if fields.flag("echo", False):
        raise APIError(400, "echo is not supported", param="echo")
    if fields.integer("best_of", 1) != 1:
        raise APIError(400, "only best_of=1 is supported", param="best_of")
    top = fields.integer("logprobs")  # OpenAI's legacy field: how many alternatives each token lists
    if top is not None and not 0 <= top <= 20:
        raise APIError(400, "logprobs must be between 0 and 20", param="logprobs")
    generate_request = GenerateRequest(
        model,
        prompt,
        options=sampling_options(fields),
        suffix=fields.text("suffix"),
        logprobs=top is not None,
        top_logprobs=top or 0,
    )
    engine = engine_of(request)
    completion_id = random_id("cmpl", "-")
    created = int(time.time())
    offset = 0  # where the next chunk's text starts in the completion (the tokens' `text_offset`)

    def body(text: str, finish_reason: str | None, logprobs: Sequence[Logprob] | None = None) -> dict[str, Any]:
        nonlocal offset
        scored = None
        if top is not None and logprobs is not None:
            scored = _completion_logprobs(logprobs, offset)
            offset += sum(len(token) for token in scored["tokens"])
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"text": text, "index": 0, "finish_reason": finish_reason, "logprobs": scored}],
        }

    if not stream:

        async def compute() -> Response:
            reply = await engine.send(generate_request)
            data = body(reply.response, _finish_reason(reply.done_reason, False), reply.logprobs or ())
            data["usage"] = _usage(reply)
            return JSON(data)

        return DisconnectAware(compute, openai_error)

    async def produce(put: Put) -> None:
        def convert(part: Any) -> list[dict[str, Any]]:
            if part.done:
                return [body(part.response, _finish_reason(part.done_reason, False), part.logprobs)]
            return [body(part.response, None, part.logprobs)] if part.response or part.logprobs else []

        last = await pump(engine.send(generate_request, stream=True), put, convert)
        if last is not None and include_usage:
            usage_chunk = body("", None)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = _usage(last)
            await put(usage_chunk)

    return sse(produce)


# --------------------------------------------------------------------------- /v1/embeddings


def _embedding_input(fields: Fields) -> list[str]:
    value = fields.data.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return value
    if isinstance(value, list) and value and all(isinstance(item, (int, list)) for item in value):
        raise APIError(400, "token arrays are not supported as input; send text", param="input")
    raise APIError(400, "'input' must be a string or a non-empty array of strings", param="input")


def _base64_floats(vector: Any) -> str:
    values = [float(x) for x in vector]
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


@endpoint
async def embeddings(request: Request) -> Response:
    fields = await read_request(request)
    model = await _model(request, fields)
    inputs = _embedding_input(fields)
    encoding = fields.text("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise APIError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
    dimensions = fields.integer("dimensions")
    engine = engine_of(request)

    async def compute() -> Response:
        result = await engine.send(EmbedRequest(model, inputs, dimensions=dimensions))
        data = []
        for index, vector in enumerate(result.embeddings):
            value: Any = _base64_floats(vector) if encoding == "base64" else [float(x) for x in vector]
            data.append({"object": "embedding", "embedding": value, "index": index})
        tokens = int(getattr(result, "prompt_eval_count", None) or 0)
        return JSON(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    return DisconnectAware(compute, openai_error)


# --------------------------------------------------------------------------- /v1/models


def _timestamp(value: Any) -> int:
    if isinstance(value, _dt.datetime):
        return int(value.timestamp())
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str) and value:
        try:
            return int(_dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
        except ValueError:
            return 0
    return 0


def _owner(name: str) -> str:
    parts = name.split(":", 1)[0].split("/") if "/" in name else [name]
    if len(parts) >= 3:
        return parts[-2]
    if len(parts) == 2:
        return parts[0]
    return "library"


def _model_json(name: str, modified_at: Any) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _timestamp(modified_at), "owned_by": _owner(name)}


@endpoint
async def list_models(request: Request) -> Response:
    models = (await engine_of(request).list()).models
    return JSON({"object": "list", "data": [_model_json(m.name, m.modified_at) for m in models]})


@endpoint
async def retrieve_model(request: Request) -> Response:
    name = await model_to_serve(request, str(request.path_params["model"]))
    info = await engine_of(request).show(name)
    return JSON(_model_json(name, getattr(info, "modified_at", None)))


def routes() -> list[Route]:
    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
    ]
