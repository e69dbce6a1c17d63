"""Ollama's REST API (``/api/...``) over an Engine: the same paths, request fields and response fields.

Streaming endpoints write NDJSON (one JSON object a line) unless the request
says ``"stream": false``. Errors are ``{"error": "..."}`` with Ollama's statuses;
an error after the stream started is written as one last ``{"error": ...}`` line.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.to_thread
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ..api import EngineAPI
from ..errors import ConversionError, DigestMismatch
from ..request import ChatRequest, EmbedRequest, GenerateRequest
from ..types import Message, as_dict, now_iso
from .common import (
    JSON,
    APIError,
    DisconnectAware,
    EventStream,
    Fields,
    HTTPSettings,
    Put,
    body_chunks,
    dumps,
    error_boundary,
    error_message,
    headers_for,
    pump,
    read_json,
    status_for,
    tool_calls,
)
from .names import checked_modelfile, checked_options, model_name, model_to_build_on, model_to_run

__all__ = ["OLLAMA_API_VERSION", "ollama_error", "progress_events", "routes"]

logger = logging.getLogger("localllm.http")

#: What ``/api/version`` answers: the Ollama release whose API this module serves, not localllm's own version
#: (``localllm --version``), which clients that gate features on Ollama's version would misread. 0.30.0 is the
#: first release listing each model's ``capabilities`` in ``/api/tags``, the newest field served here.
OLLAMA_API_VERSION = "0.30.0"


# --------------------------------------------------------------------------- errors and helpers


def ollama_error(exc: BaseException) -> Response:
    """``{"error": "..."}`` with the status the error maps to."""
    return JSON({"error": error_message(exc)}, status_code=status_for(exc), headers=headers_for(exc))


def _error_line(exc: BaseException) -> bytes:
    return (dumps({"error": error_message(exc)}) + "\n").encode("utf-8")


def _line(item: Any) -> bytes:
    return (dumps(item) + "\n").encode("utf-8")


def ndjson(produce: Callable[[Put], Awaitable[None]]) -> EventStream:
    return EventStream(
        produce,
        encode=_line,
        encode_error=_error_line,
        on_error=ollama_error,
        media_type="application/x-ndjson",
    )


def deferred(compute: Callable[[], Awaitable[Response]]) -> DisconnectAware:
    return DisconnectAware(compute, ollama_error)


#: Answers errors raised while reading and checking the request in Ollama's shape.
endpoint = error_boundary(ollama_error)


def engine_of(request: Request) -> EngineAPI:
    engine: EngineAPI | None = getattr(request.app.state, "engine", None)
    if engine is None:
        raise APIError(503, "the engine is not running")
    return engine


def settings_of(request: Request) -> HTTPSettings:
    settings: HTTPSettings = request.app.state.settings
    return settings


async def read_request(request: Request) -> Fields:
    settings = settings_of(request)
    return Fields(await read_json(request, settings.max_request_size, settings.body_timeout))


def model_field(fields: Fields, *names: str) -> str:
    """The model a request names (``model``, or the older ``name``); 400 if none."""
    for name in names or ("model", "name"):
        value = fields.text(name)
        if value:
            return str(value)
    raise APIError(400, "model is required", param="model")


async def options_to_serve(request: Request, fields: Fields) -> Any:
    """A request's options, its `draft_model` checked as a model it runs."""
    allowed = settings_of(request).allow_local_paths
    return await checked_options(engine_of(request), fields.options(), allow_local_paths=allowed)


async def model_to_serve(request: Request, model: str) -> str:
    """A model a request runs or shows, checked (see `names`) before the Engine sees it."""
    allowed = settings_of(request).allow_local_paths
    return await model_to_run(engine_of(request), model, allow_local_paths=allowed)


def message_json(message: Message) -> dict[str, Any]:
    """A message as Ollama writes it (tool calls without empty ids)."""
    data: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.thinking:
        data["thinking"] = message.thinking
    if message.images:
        data["images"] = list(message.images)
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            entry: dict[str, Any] = {
                "function": {
                    "index": call.function.index,
                    "name": call.function.name,
                    "arguments": dict(call.function.arguments),
                }
            }
            if call.id:
                entry["id"] = call.id
            calls.append(entry)
        data["tool_calls"] = calls
    if message.tool_name:
        data["tool_name"] = message.tool_name
    return data


def generate_json(chunk: Any) -> dict[str, Any]:
    data = as_dict(chunk)
    data.setdefault("response", "")
    return data


def chat_json(chunk: Any) -> dict[str, Any]:
    data = as_dict(chunk)
    data["message"] = message_json(chunk.message)
    return data


def _floats(vector: Any) -> list[float]:
    return [float(x) for x in vector]


# --------------------------------------------------------------------------- progress (pull, create)

Emit = Callable[[Mapping[str, Any]], None]


async def progress_events(operation: Callable[[Emit], Awaitable[Any]], put: Put) -> None:
    """Run `operation(emit)` and put every progress event it emits, in order, as it comes.

    `emit` is called in the event loop: the Engine delivers its progress callbacks there.
    """
    send, receive = anyio.create_memory_object_stream[dict[str, Any]](math.inf)
    failure: list[BaseException] = []

    def emit(event: Mapping[str, Any]) -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):  # the client left
            send.send_nowait(dict(event))

    async def work() -> None:
        with send:
            try:
                await operation(emit)
            except Exception as exc:
                failure.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(work)
        with receive:
            async for event in receive:
                await put(event)
    if failure:
        raise failure[0]


# --------------------------------------------------------------------------- the rendered prompt only
# Ollama's `_debug_render_only`: what a request's prompt renders to (`EngineAPI.render`), answered without
# running the model.


def debug_response(model: str, text: str, images: int, **empty: Any) -> Response:
    """Ollama's answer: an empty, unfinished response (`response`, or `message`, as `empty` gives) and the prompt."""
    info: dict[str, Any] = {"rendered_template": text}
    if images:
        info["image_count"] = images
    return JSON({"model": model, "created_at": now_iso(), **empty, "done": False, "_debug_info": info})


# --------------------------------------------------------------------------- generation


def respond(
    engine: EngineAPI,
    request: GenerateRequest | ChatRequest | EmbedRequest,
    stream: bool,
    to_json: Callable[[Any], dict[str, Any]],
) -> Response:
    """The response to a request: NDJSON lines as chunks come, or one JSON object once it is done."""
    if stream:

        async def produce(put: Put) -> None:
            await pump(engine.send(request, stream=True), put, lambda chunk: [to_json(chunk)])

        return ndjson(produce)

    async def compute() -> Response:
        return JSON(to_json(await engine.send(request)))

    return deferred(compute)


@endpoint
async def generate(request: Request) -> Response:
    fields = await read_request(request)
    generate_request = GenerateRequest(
        await model_to_serve(request, model_field(fields)),
        fields.text("prompt", ""),
        suffix=fields.text("suffix"),
        system=fields.text("system"),
        template=fields.text("template"),
        context=fields.token_ids("context"),
        raw=fields.flag("raw", False),
        format=fields.format(),
        images=fields.texts("images"),
        options=await options_to_serve(request, fields),
        keep_alive=fields.duration("keep_alive"),
        think=fields.think(),
        logprobs=fields.flag("logprobs", False),
        top_logprobs=fields.integer("top_logprobs", 0),
        truncate=fields.flag("truncate", True),
        shift=fields.flag("shift", True),
    )
    engine = engine_of(request)
    # An empty request loads the model, as in Ollama, even when only its prompt is asked for.
    if fields.flag("_debug_render_only", False) and not generate_request.is_empty:
        text = await engine.render(generate_request)
        return debug_response(generate_request.model, text, generate_request.image_count, response="")
    return respond(engine, generate_request, fields.flag("stream", True), generate_json)


def chat_messages(fields: Fields) -> list[dict[str, Any]]:
    messages = []
    for index, message in enumerate(fields.array("messages", [])):
        if not isinstance(message, dict):
            raise APIError(400, f"invalid message at index {index}: expected an object with 'role' and 'content'")
        if message.get("tool_calls") is not None:
            message = {**message, "tool_calls": tool_calls(message["tool_calls"], f"messages[{index}].tool_calls")}
        messages.append(message)
    return messages


@endpoint
async def chat(request: Request) -> Response:
    fields = await read_request(request)
    chat_request = ChatRequest(
        await model_to_serve(request, model_field(fields)),
        chat_messages(fields),
        tools=fields.array("tools"),
        format=fields.format(),
        options=await options_to_serve(request, fields),
        keep_alive=fields.duration("keep_alive"),
        think=fields.think(),
        tool_choice=fields.data.get("tool_choice"),
        logprobs=fields.flag("logprobs", False),
        top_logprobs=fields.integer("top_logprobs", 0),
        truncate=fields.flag("truncate", True),
        shift=fields.flag("shift", True),
    )
    engine = engine_of(request)
    # No messages loads the model, as in Ollama, even when only the prompt is asked for.
    if fields.flag("_debug_render_only", False) and not chat_request.is_empty:
        text = await engine.render(chat_request)
        return debug_response(chat_request.model, text, chat_request.image_count, message={"role": "", "content": ""})
    return respond(engine, chat_request, fields.flag("stream", True), chat_json)


# --------------------------------------------------------------------------- embeddings


def _embed_input(fields: Fields) -> str | list[str]:
    value = fields.data.get("input")
    if value is None:
        return []
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise APIError(400, "invalid input type: 'input' must be a string or an array of strings", param="input")


@endpoint
async def embed(request: Request) -> Response:
    fields = await read_request(request)
    embed_request = EmbedRequest(
        await model_to_serve(request, model_field(fields)),
        _embed_input(fields),
        truncate=fields.flag("truncate", True),
        dimensions=fields.integer("dimensions"),
        options=fields.options(),
        keep_alive=fields.duration("keep_alive"),
    )
    engine = engine_of(request)

    async def compute() -> Response:
        result = await engine.send(embed_request)
        body: dict[str, Any] = {"model": embed_request.model, "embeddings": [_floats(v) for v in result.embeddings]}
        for name in ("total_duration", "load_duration", "prompt_eval_count"):
            value = getattr(result, name, None)
            if value is not None:
                body[name] = value
        return JSON(body)

    return deferred(compute)


@endpoint
async def embeddings(request: Request) -> Response:
    """The older single-prompt endpoint: ``{"prompt": ...}`` -> ``{"embedding": [...]}`` (not normalised)."""
    fields = await read_request(request)
    model = await model_to_serve(request, model_field(fields))
    prompt = fields.text("prompt", "")
    options = fields.options()
    keep_alive = fields.duration("keep_alive")
    engine = engine_of(request)

    async def compute() -> Response:
        if not prompt:
            return JSON({"embedding": []})
        result = await engine.embeddings(model, prompt, options=options, keep_alive=keep_alive)
        return JSON({"embedding": _floats(result.embedding)})

    return deferred(compute)


# --------------------------------------------------------------------------- the model store


@endpoint
async def tags(request: Request) -> Response:
    models = [as_dict(m) for m in (await engine_of(request).list()).models]
    for model in models:  # as Ollama's, left out when there are none to tell
        if not model.get("capabilities"):
            model.pop("capabilities", None)
    return JSON({"models": models})


@endpoint
async def show(request: Request) -> Response:
    fields = await read_request(request)
    model = await model_to_serve(request, model_field(fields))
    verbose = fields.flag("verbose", False)
    info = await engine_of(request).show(model, verbose=verbose)
    data = as_dict(info)
    for key in ("messages", "tensors", "projector_info"):  # as Ollama's, left out when empty
        if not data.get(key):
            data.pop(key, None)
    for key in ("system", "license"):
        if data.get(key) == "":
            data.pop(key)
    return JSON(data)


@endpoint
async def ps(request: Request) -> Response:
    running = (await engine_of(request).ps()).models
    models = []
    for item in running:
        details = getattr(item, "details", None)
        models.append(
            {
                "name": item.name,
                "model": getattr(item, "model", item.name),
                "size": item.size,
                "digest": getattr(item, "digest", "") or "",
                "details": as_dict(details) if details is not None else {},
                "expires_at": getattr(item, "expires_at", None),
                "size_vram": getattr(item, "size_vram", 0),
                "context_length": getattr(item, "context_length", 0),
            }
        )
    return JSON({"models": models})


@endpoint
async def copy(request: Request) -> Response:
    fields = await read_request(request)
    source = fields.text("source")
    destination = fields.text("destination")
    if not source or not destination:
        raise APIError(400, "both 'source' and 'destination' are required")
    model_name(source, "source")
    model_name(destination, "destination")
    await engine_of(request).copy(source, destination)
    return Response(status_code=200)


@endpoint
async def delete(request: Request) -> Response:
    fields = await read_request(request)
    model = model_field(fields)
    model_name(model)
    await engine_of(request).delete(model)
    return Response(status_code=200)


@endpoint
async def pull(request: Request) -> Response:
    fields = await read_request(request)
    model = model_field(fields)
    model_name(model)
    insecure = fields.flag("insecure", False)
    stream = fields.flag("stream", True)
    engine = engine_of(request)

    async def operation(emit: Emit) -> None:
        await engine.pull(model, progress=emit, insecure=insecure)

    return _progress_response(operation, stream)


@endpoint
async def push(request: Request) -> Response:
    raise APIError(501, "localllm cannot push models to a registry")


def _progress_response(operation: Callable[[Emit], Awaitable[None]], stream: bool) -> Response:
    if stream:

        async def produce(put: Put) -> None:
            await progress_events(operation, put)

        return ndjson(produce)

    async def compute() -> Response:
        await operation(lambda _event: None)
        return JSON({"status": "success"})

    return deferred(compute)


# --------------------------------------------------------------------------- blobs and create


_DIGEST = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")


def _digest_param(request: Request) -> str:
    digest = str(request.path_params["digest"])
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise APIError(400, f"invalid digest {digest!r}: expected 'sha256:' followed by 64 hex digits")
    return "sha256:" + match.group(1).lower()


@endpoint
async def head_blob(request: Request) -> Response:
    digest = _digest_param(request)
    if not await engine_of(request).has_blob(digest):
        return JSON({"error": f"blob {digest!r} not found"}, status_code=404)
    return Response(status_code=200)


@endpoint
async def upload_blob(request: Request) -> Response:
    """Receive a file under its sha256 digest; 400 when the bytes do not match it, 413 when too large."""
    digest = _digest_param(request)
    engine = engine_of(request)
    limit = settings_of(request).max_blob_size
    timeout = settings_of(request).body_timeout
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"blob of {declared} bytes is larger than the limit of {limit} bytes")
    if await engine.has_blob(digest):
        async for _chunk in body_chunks(request, timeout):  # read what the client sends, keep nothing
            pass
        return Response(status_code=200)
    try:
        await engine.add_blob(digest, body_chunks(request, timeout), max_size=limit)
    except DigestMismatch as exc:  # the client sent the wrong bytes: its mistake, unlike a download's
        raise APIError(400, f"digest mismatch, expected {exc.expected!r}, got {exc.actual!r}") from None
    return Response(status_code=201)


def _licenses(fields: Fields) -> list[str] | None:
    value = fields.data.get("license")
    if value is None or isinstance(value, str):
        return value if value is None else [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise APIError(400, "invalid value for 'license': expected a string or an array of strings", param="license")


def _create_messages(fields: Fields) -> list[dict[str, str]] | None:
    messages = fields.array("messages")
    if messages is None:
        return None
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, "invalid value for 'messages': each message needs a 'role' and 'content'")
    return [{"role": m["role"], "content": str(m.get("content") or "")} for m in messages]


def _digests(fields: Fields, name: str) -> dict[str, str] | None:
    """``files`` or ``adapters``: file name -> digest of an uploaded blob."""
    value = fields.mapping(name)
    for file, digest in (value or {}).items():
        if not isinstance(digest, str):
            raise APIError(400, f"invalid value for '{name}': the digest of {file!r} must be a string", param=name)
    return value


@endpoint
async def create(request: Request) -> Response:
    """Ollama's create: its fields go to `Engine.create` as they are, once every model and file named is checked."""
    fields = await read_request(request)
    model = model_field(fields)
    model_name(model)
    stream = fields.flag("stream", True)
    engine = engine_of(request)
    allowed = settings_of(request).allow_local_paths
    base = fields.text("from")
    if base:
        base = await model_to_build_on(engine, base, "from", allow_local_paths=allowed)
    modelfile = fields.text("modelfile")
    given = await checked_modelfile(engine, modelfile, allow_local_paths=allowed) if modelfile else None
    parameters = fields.mapping("parameters")
    await checked_options(engine, parameters or {}, "parameters", allow_local_paths=allowed)
    parts: dict[str, Any] = {
        "files": _digests(fields, "files"),
        "adapters": _digests(fields, "adapters"),
        "template": fields.text("template"),
        "system": fields.text("system"),
        "parameters": parameters,
        "messages": _create_messages(fields),
        "license": _licenses(fields),
        "renderer": fields.text("renderer"),
        "parser": fields.text("parser"),
        "requires": fields.text("requires"),
    }
    quantize = fields.text("quantize")

    async def operation(emit: Emit) -> None:
        try:
            await engine.create(
                model,
                from_=base or None,
                modelfile=given.format() if given is not None else None,
                quantize=quantize,
                progress=emit,
                **parts,
            )
        except ConversionError as exc:  # what was uploaded, or the quantization asked for, cannot be converted
            field = "files" if fields.has("files") else "quantize"
            raise APIError(400, f"invalid value for '{field}': {exc}", param=field) from None

    return _progress_response(operation, stream)


# --------------------------------------------------------------------------- misc


async def root(request: Request) -> Response:
    return PlainTextResponse("Ollama is running")


async def version(request: Request) -> Response:
    return JSON({"version": OLLAMA_API_VERSION})


def routes() -> list[Route]:
    return [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/api/version", version, methods=["GET", "HEAD"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/embed", embed, methods=["POST"]),
        Route("/api/embeddings", embeddings, methods=["POST"]),
        Route("/api/tags", tags, methods=["GET", "HEAD"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/copy", copy, methods=["POST"]),
        Route("/api/delete", delete, methods=["DELETE"]),
        Route("/api/pull", pull, methods=["POST"]),
        Route("/api/push", push, methods=["POST"]),
        Route("/api/create", create, methods=["POST"]),
        Route("/api/blobs/{digest}", head_blob, methods=["HEAD"]),
        Route("/api/blobs/{digest}", upload_blob, methods=["POST"]),
    ]
