"""Plumbing shared by the Ollama and OpenAI routes: errors and their statuses, request bodies, JSON, streaming.

Every response that runs a model is an ASGI callable that watches for the
client's ``http.disconnect`` while it works: when the client goes away, the
work is cancelled and the engine's stream closed, which frees the sequence
slot at once.
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import json
import logging
import math
import re
import secrets
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, MutableMapping
from contextvars import ContextVar
from pathlib import Path, PurePath
from typing import Any

import anyio
import attrs
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import errors
from ..options import OPTION_TYPES
from ..parsing import parse_keep_alive

__all__ = [
    "JSON",
    "APIError",
    "ClientGone",
    "DisconnectAware",
    "EventStream",
    "Fields",
    "HTTPSettings",
    "HideServerPaths",
    "Put",
    "body_chunks",
    "check_values",
    "dumps",
    "error_message",
    "headers_for",
    "json_text",
    "log_unexpected",
    "pump",
    "read_body",
    "read_json",
    "status_for",
    "tool_calls",
]

logger = logging.getLogger("localllm.http")

MiB = 1 << 20
GiB = 1 << 30

#: Seconds a request body may pause before the client gets 408 (`HTTPSettings.body_timeout`).
DEFAULT_BODY_TIMEOUT = 60.0


@attrs.frozen
class HTTPSettings:
    """Limits and permissions of the HTTP shim."""

    #: Largest accepted body of a JSON endpoint (prompts, messages, base64 images).
    max_request_size: int = 32 * MiB
    #: Largest accepted blob upload (a model file) on ``POST /api/blobs/<digest>``.
    max_blob_size: int = 256 * GiB
    #: Whether requests may name files on the server (model paths, ``from``, Modelfile FROM and ADAPTER).
    allow_local_paths: bool = False
    #: Longest pause, in seconds, while a request body arrives: a client that sends nothing for this long gets
    #: 408 and its connection is closed.
    body_timeout: float = DEFAULT_BODY_TIMEOUT


class ClientGone(Exception):
    """The client closed the connection while we were writing to it."""


class APIError(Exception):
    """An error answered with a given HTTP status (and, for OpenAI clients, a param and code)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        #: Extra response headers (``connection: close`` for a client that stalled).
        self.headers = dict(headers or {})


def headers_for(exc: BaseException) -> dict[str, str] | None:
    """The extra headers an error is answered with, if any."""
    return getattr(exc, "headers", None) or None


def status_for(exc: BaseException) -> int:
    """The HTTP status an exception is answered with (localllm's errors: `errors.HTTP_STATUS`, the one table)."""
    if isinstance(exc, APIError):
        return exc.status
    return errors.http_status(exc)


def error_message(exc: BaseException) -> str:
    """What a client is told about `exc`: its message, without the server's own folders."""
    if isinstance(exc, APIError):
        return hide_server_paths(exc.message)
    if isinstance(exc, errors.LocalLLMError):
        return hide_server_paths(str(exc) or type(exc).__name__)
    return hide_server_paths(f"internal error: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- server paths in error messages

Redaction = tuple[re.Pattern[str], str]

#: How to hide the folders of the engine serving the current request (set by `HideServerPaths`).
_redactions: ContextVar[tuple[Redaction, ...]] = ContextVar("localllm_http_redactions", default=())

#: The scratch folders the Engine's create lays a model uploaded in several files out in (the registry's
#: `SCRATCH_PREFIX`, which the shim does not import).
CREATE_FOLDER_PREFIX = "localllm-create-"


def _spellings(folder: Path) -> list[str]:
    spellings = {str(folder), str(folder.resolve())}  # the store may report either
    return sorted(spellings, key=len, reverse=True)


def redactions_for(engine: Any) -> tuple[Redaction, ...]:
    """Blob paths become their digests; the store, the engine's home and scratch folders become labels."""
    settings = getattr(engine, "settings", None)
    rules: list[Redaction] = []
    models = getattr(settings, "models", None)
    home = getattr(settings, "home", None)
    if models is not None:
        for spelling in _spellings(Path(models)):
            blob = re.compile(re.escape(spelling) + r"[/\\]blobs[/\\]sha256-([0-9a-fA-F]{64})")
            rules.append((blob, r"sha256:\1"))
            rules.append((re.compile(re.escape(spelling)), "<models>"))
    if home is not None:
        rules.extend((re.compile(re.escape(spelling)), "<home>") for spelling in _spellings(Path(home)))
    for spelling in _spellings(Path(tempfile.gettempdir())):
        scratch = re.escape(spelling) + r"[/\\]" + re.escape(CREATE_FOLDER_PREFIX) + r"[^/\\\s'\"]*"
        rules.append((re.compile(scratch), "<uploaded files>"))
    return tuple(rules)


def hide_server_paths(text: str) -> str:
    for pattern, replacement in _redactions.get():
        text = pattern.sub(replacement, text)
    return text


class HideServerPaths:
    """ASGI middleware: error messages written while serving a request do not show where the engine keeps its files."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._cached: tuple[Any, tuple[Redaction, ...]] = (None, ())

    def _rules(self, scope: Scope) -> tuple[Redaction, ...]:
        app = scope.get("app")
        engine = getattr(getattr(app, "state", None), "engine", None)
        if engine is None:
            return ()
        if self._cached[0] is not engine:
            self._cached = (engine, redactions_for(engine))
        return self._cached[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = _redactions.set(self._rules(scope))
        try:
            await self.app(scope, receive, send)
        finally:
            _redactions.reset(token)


def log_unexpected(exc: BaseException) -> None:
    """Server-side errors get a traceback in the log; client errors (and clients leaving) do not."""
    if isinstance(exc, (APIError, errors.UnavailableError, ClientDisconnect, ClientGone)):
        return
    if status_for(exc) >= 500:
        logger.error("request failed", exc_info=exc)


Endpoint = Callable[[Request], Awaitable[Response]]


def error_boundary(to_response: Callable[[BaseException], Response]) -> Callable[[Endpoint], Endpoint]:
    """A decorator answering errors raised while reading and checking a request with `to_response`."""

    def decorate(handler: Endpoint) -> Endpoint:
        @functools.wraps(handler)
        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                log_unexpected(exc)
                return to_response(exc)

        return wrapped

    return decorate


# --------------------------------------------------------------------------- JSON


def _json_default(value: Any) -> Any:
    if attrs.has(type(value)):
        from ..types import as_dict

        return as_dict(value)
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """Compact JSON, as Ollama writes it."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(json.loads(json.dumps(value, default=_json_default))), separators=(",", ":"))


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")


# --------------------------------------------------------------------------- request bodies


async def body_chunks(request: Request, timeout: float) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive; 408 when none comes for `timeout` seconds.

    The 408 closes the connection: the rest of a stalled body is never read, so the socket is not held.
    """
    chunks = request.stream().__aiter__()
    while True:
        try:
            with anyio.fail_after(timeout):
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise APIError(
                408,
                f"the request body stalled: nothing arrived for {timeout:g} s; send the whole body without pausing",
                headers={"connection": "close"},
            ) from None
        yield chunk


async def read_body(request: Request, limit: int, timeout: float = DEFAULT_BODY_TIMEOUT) -> bytes:
    """The whole body, or 413 once it passes `limit` bytes (408 if it stalls for `timeout` seconds)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise APIError(400, f"invalid Content-Length header {declared!r}") from None
        if size > limit:
            raise APIError(413, f"request body of {size} bytes is larger than the limit of {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in body_chunks(request, timeout):
        total += len(chunk)
        if total > limit:
            raise APIError(413, f"request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


#: Deepest nesting of arrays and objects a request may have (JSON schemas and tool arguments stay far below).
MAX_JSON_DEPTH = 100

_SURROGATE = re.compile("[\ud800-\udfff]")
_INTEGER_LIMIT = 1 << 64

#: The longest duration Ollama can hold (a Go duration: 2**63 - 1 ns, some 292 years); longer is no moment in time.
MAX_DURATION_SECONDS = (2**63 - 1) / 1e9


async def read_json(request: Request, limit: int, timeout: float = DEFAULT_BODY_TIMEOUT) -> dict[str, Any]:
    """The body as a JSON object; 400 when it is missing, not JSON or holds values `check_values` refuses."""
    body = await read_body(request, limit, timeout)
    if not body.strip():
        raise APIError(400, "missing request body")
    try:
        data = json.loads(body)
    except RecursionError:
        raise APIError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as exc:
        raise APIError(400, f"invalid JSON in request body: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_json_type(data)}")
    check_values(data)
    return data


def _member(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def _invalid(where: str, problem: str) -> APIError:
    if not where:
        return APIError(400, f"invalid request body: {problem}")
    return APIError(400, f"invalid value for '{where}': {problem}", param=where)


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def check_values(data: dict[str, Any] | list[Any], where: str = "") -> None:
    """Refuse, naming the field, what Python's parser lets through but nothing after it should see.

    That is nesting deeper than `MAX_JSON_DEPTH`, NaN and infinities (``NaN``,
    ``Infinity``, ``1e400``: not JSON, or not a number), integers beyond 64
    bits, and lone UTF-16 surrogates (``"\\ud800"``), which no UTF-8 text can hold.
    Iterative, so no depth of nesting exhausts the stack. `where` names `data` in messages.
    """
    # Each container with its path, its depth, and the outermost field it is in (too deep a nesting names that).
    pending: list[tuple[dict[str, Any] | list[Any], str, int, str | None]] = [(data, where, 1, where or None)]
    while pending:
        container, where, depth, field = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise _invalid(field or "", f"nested more than {MAX_JSON_DEPTH} levels deep")
        items: Iterable[tuple[str | int, Any]] = (
            container.items() if isinstance(container, dict) else enumerate(container)
        )
        for key, value in items:
            if isinstance(key, str) and _has_surrogate(key):
                raise _invalid(where, "a key holds a lone UTF-16 surrogate")
            if isinstance(value, (dict, list)):
                inner = _member(where, key)
                pending.append((value, inner, depth + 1, inner if field is None else field))
            elif isinstance(value, str):
                if _has_surrogate(value):
                    raise _invalid(_member(where, key), "the text holds a lone UTF-16 surrogate")
            elif isinstance(value, float):
                if not math.isfinite(value):
                    shown = "NaN" if math.isnan(value) else "an infinite or out-of-range number"
                    raise _invalid(_member(where, key), f"{shown} is not allowed")
            elif isinstance(value, int) and abs(value) >= _INTEGER_LIMIT:
                raise _invalid(_member(where, key), "the integer is out of range")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def json_text(text: str, field: str) -> Any:
    """JSON written inside a string field, held to the rules of a request body."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise _invalid(field, f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as exc:
        raise _invalid(field, f"not JSON ({exc})") from None
    if isinstance(value, (dict, list)):
        check_values(value, field)
    return value


def random_id(prefix: str, separator: str = "_") -> str:
    """An id as the API it is for writes them: `prefix`, the separator, 24 random hex digits."""
    return f"{prefix}{separator}{secrets.token_hex(12)}"


def tool_result(content: str, call_id: str, tool_name: str | None, images: list[str] | None) -> dict[str, Any]:
    """The tool message that answers the call `call_id` (by its tool's name, where the call was seen)."""
    message: dict[str, Any] = {"role": "tool", "content": content, "tool_call_id": call_id}
    if tool_name:
        message["tool_name"] = tool_name
    if images:
        message["images"] = images
    return message


def tool_calls(value: Any, field: str) -> list[dict[str, Any]]:
    """The tool calls of a message, each ``{"id", "function": {"name", "arguments", "index"}}``.

    ``arguments`` is an object, or JSON text of one (as OpenAI writes it).
    """
    if not isinstance(value, list):
        raise _invalid(field, "expected an array of tool calls")
    calls = []
    for position, call in enumerate(value):
        where = f"{field}[{position}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _invalid(where, "a tool call needs a 'function' with a 'name'")
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            arguments = json_text(arguments, f"{where}.function.arguments") if arguments.strip() else {}
        if not isinstance(arguments, dict):
            raise _invalid(f"{where}.function.arguments", "expected an object")
        index = function.get("index", position)
        if not isinstance(index, int) or isinstance(index, bool):
            raise _invalid(f"{where}.function.index", "expected an integer")
        call_id = call.get("id") or ""
        if not isinstance(call_id, str):
            raise _invalid(f"{where}.id", "expected a string")
        calls.append({"id": call_id, "function": {"name": function["name"], "arguments": arguments, "index": index}})
    return calls


class Fields:
    """Typed access to the fields of a JSON request; a wrong type is a 400 naming the field."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data

    def _bad(self, name: str, expected: str) -> APIError:
        got = _json_type(self.data.get(name))
        return APIError(400, f"invalid value for '{name}': expected {expected}, got {got}", param=name)

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def text(self, name: str, default: Any = None) -> Any:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._bad(name, "a string")
        return value

    def flag(self, name: str, default: Any = None) -> Any:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(name, "true or false")
        return value

    def integer(self, name: str, default: Any = None) -> Any:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._bad(name, "an integer")
        return value

    def number(self, name: str, default: Any = None) -> Any:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self._bad(name, "a number")
        return value

    def mapping(self, name: str, default: Any = None) -> Any:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, dict):
            raise self._bad(name, "an object")
        return value

    def options(self, name: str = "options") -> Any:
        """Model options without the keys no option has, which are logged, as Ollama does.

        Not left to the Engine, which warns about each: Python keeps every distinct warning for
        good, so a client sending new names would grow the server without end.
        """
        value = self.mapping(name)
        if value is None:
            return None
        unknown = [key for key in value if key not in OPTION_TYPES]
        if unknown:
            shown = ", ".join(repr(key[:40]) for key in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            logger.warning("ignoring %d unknown option(s) in '%s': %s", len(unknown), name, shown)
        return {key: option for key, option in value.items() if key in OPTION_TYPES}

    def array(self, name: str, default: Any = None) -> Any:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, list):
            raise self._bad(name, "an array")
        return value

    def texts(self, name: str, default: Any = None) -> Any:
        value = self.array(name)
        if value is None:
            return default
        if not all(isinstance(item, str) for item in value):
            raise self._bad(name, "an array of strings")
        return value

    def integers(self, name: str, default: Any = None) -> Any:
        value = self.array(name)
        if value is None:
            return default
        if not all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            raise self._bad(name, "an array of integers")
        return value

    def token_ids(self, name: str) -> Any:
        """An array of token ids: integers from 0 to 2**31 - 1 (llama.cpp's token type)."""
        value = self.integers(name)
        if value is not None and not all(0 <= item < 1 << 31 for item in value):
            raise APIError(400, f"invalid value for '{name}': token ids are integers from 0 to 2147483647", param=name)
        return value

    def duration(self, name: str, default: Any = None) -> Any:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self._bad(name, "a duration string or a number of seconds")
        try:
            seconds = parse_keep_alive(value, default=0.0)
        except errors.InvalidOptions as exc:
            raise APIError(400, f"invalid value for '{name}': {exc}", param=name) from None
        if math.isfinite(seconds) and seconds > MAX_DURATION_SECONDS:
            problem = "longer than 292 years; a negative value keeps the model loaded for good"
            raise APIError(400, f"invalid value for '{name}': {value!r} is {problem}", param=name)
        return value

    def think(self, name: str = "think") -> Any:
        value = self.data.get(name)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str) and value in ("low", "medium", "high", "max"):
            return value
        raise APIError(400, f"invalid value for '{name}': expected true, false, 'low', 'medium', 'high' or 'max'")

    def format(self, name: str = "format") -> Any:
        value = self.data.get(name)
        if value is None or value == "":
            return None
        if value == "json" or isinstance(value, dict):
            return value
        raise APIError(400, f"invalid value for '{name}': expected \"json\" or a JSON schema object", param=name)


# --------------------------------------------------------------------------- disconnect-aware responses

ErrorResponder = Callable[[BaseException], Response]


async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope, state: dict[str, bool]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            state["disconnected"] = True
            scope.cancel()
            return


class DisconnectAware(Response):
    """Computes a response while watching for the client to go away (then the computation is cancelled)."""

    def __init__(self, compute: Callable[[], Awaitable[Response]], on_error: ErrorResponder) -> None:
        self.background = None
        self._compute = compute
        self._on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = {"disconnected": False}
        response: Response | None = None
        async with anyio.create_task_group() as group:
            group.start_soon(_watch_disconnect, receive, group.cancel_scope, state)
            try:
                response = await self._compute()
            except Exception as exc:
                log_unexpected(exc)
                response = self._on_error(exc)
            group.cancel_scope.cancel()
        if response is not None and not state["disconnected"]:
            try:
                await response(scope, _no_receive, send)
            except OSError:
                pass


async def _no_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}


Put = Callable[[Any], Awaitable[None]]
"""Sends one item down a stream (the first one also starts the response)."""


class EventStream(Response):
    """Streams what a producer puts (NDJSON lines or server-sent events) as it comes.

    `produce(put)` runs while the client is connected. An error it raises
    before its first item is answered with that error's own status; a later
    one is written into the stream with `encode_error` and ends it. A client
    that disconnects cancels the producer; producers close the engine's stream
    in a ``finally`` (see `pump`), which frees the sequence slot.
    """

    def __init__(
        self,
        produce: Callable[[Put], Awaitable[None]],
        *,
        encode: Callable[[Any], bytes],
        encode_error: Callable[[BaseException], bytes],
        on_error: ErrorResponder,
        media_type: str,
        trailer: bytes = b"",
    ) -> None:
        self.background = None
        self._produce = produce
        self._encode = encode
        self._encode_error = encode_error
        self._on_error = on_error
        self._media_type = media_type
        self._trailer = trailer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = {"disconnected": False}

        async def checked_send(message: MutableMapping[str, Any]) -> None:
            try:
                await send(message)
            except OSError as exc:
                raise ClientGone from exc

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_watch_disconnect, receive, group.cancel_scope, state)
                await self._run(scope, checked_send)
                group.cancel_scope.cancel()
        except ClientGone:
            pass  # the client went away while we were writing to it

    async def _run(self, scope: Scope, send: Send) -> None:
        started = False

        async def start() -> None:
            nonlocal started
            if not started:
                started = True
                headers = [
                    (b"content-type", self._media_type.encode("latin-1")),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ]
                await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def put(item: Any) -> None:
            await start()
            await send({"type": "http.response.body", "body": self._encode(item), "more_body": True})

        try:
            await self._produce(put)
        except ClientGone:
            raise
        except Exception as exc:
            log_unexpected(exc)
            if not started:
                await self._on_error(exc)(scope, _no_receive, send)
            else:
                await send({"type": "http.response.body", "body": self._encode_error(exc), "more_body": False})
            return
        await start()
        await send({"type": "http.response.body", "body": self._trailer, "more_body": False})


async def pump(stream: Any, put: Put, convert: Callable[[Any], Iterable[Any]]) -> Any:
    """Put what `convert` makes of each chunk of an engine stream; close the stream however this ends.

    Returns the last chunk (None if there was none).
    """
    iterator = stream.__aiter__()
    last = None
    try:
        async for chunk in iterator:
            last = chunk
            for item in convert(chunk):
                await put(item)
    finally:
        close = getattr(iterator, "aclose", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                await close()
    return last
