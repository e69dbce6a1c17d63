"""The server's address (``$LOCALLLM_HOST``, else ``$OLLAMA_HOST``) and what the commands ask a running server.

A fresh process has nothing loaded, so ``ps``, ``stop`` and ``run`` use the server when one answers;
they speak Ollama's API, so the server may be ``localllm serve`` or Ollama itself.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import attrs

from ..embeddings import EmbedResponse
from ..errors import ModelNotFound
from ..types import ChatResponse, GenerateResponse, Message, ProgressResponse, ShowResponse, as_dict
from .errors import CLIError
from .format import parse_time

if TYPE_CHECKING:
    import httpx

    from ..registry.registry import ModelDetails
    from ..types import MessageLike

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "JSONObject",
    "RemoteModels",
    "host_setting",
    "parse_host",
    "running_models",
    "running_server",
    "server_url",
    "stop_model",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434

T = TypeVar("T")


def host_setting() -> tuple[str, str] | None:
    """The variable naming the server's address and its value: ``LOCALLLM_HOST``, else ``OLLAMA_HOST``; or None."""
    for name in ("LOCALLLM_HOST", "OLLAMA_HOST"):
        value = os.environ.get(name, "").strip()
        if value:
            return name, value
    return None


def server_url() -> str:
    """The base URL of the server named by ``$LOCALLLM_HOST`` or ``$OLLAMA_HOST`` (default ``http://127.0.0.1:11434``)."""
    setting = host_setting()
    value = setting[1] if setting else f"{DEFAULT_HOST}:{DEFAULT_PORT}"
    if "://" not in value:
        value = "http://" + value
    scheme, _, rest = value.partition("://")
    if ":" not in rest.rsplit("]", 1)[-1]:
        rest = f"{rest}:{DEFAULT_PORT}"
    return f"{scheme}://{rest}".rstrip("/")


def parse_host(value: str) -> tuple[str, int]:
    """Host and port from ``host``, ``host:port``, ``[v6]:port`` or a URL; ValueError for a bad port."""
    text = value.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.rstrip("/")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
        return host, int(port) if port else DEFAULT_PORT
    if text.count(":") == 1:
        host, port = text.split(":")
        return host or DEFAULT_HOST, int(port)
    return text or DEFAULT_HOST, DEFAULT_PORT


def running_server() -> httpx.Client | None:
    """An httpx client for a server answering at the address `server_url` names, or None."""
    import httpx

    client = httpx.Client(base_url=server_url(), timeout=httpx.Timeout(30.0, connect=0.5))
    try:
        answer = client.get("/")
        if answer.status_code == 200 and "running" in answer.text:
            return client
    except httpx.HTTPError:
        pass
    client.close()
    return None


def _server_error(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error") or response.text)
    except ValueError:
        return response.text or f"HTTP {response.status_code}"


def _failure(response: httpx.Response) -> Exception:
    """The error a failed answer stands for: not found as the Engine says it, anything else as the server said it."""
    message = _server_error(response)
    return ModelNotFound(message) if response.status_code == 404 else CLIError(message)


class JSONObject:
    """Attribute access to a JSON object (missing fields are None), read as the Engine's result types are."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        return self._data.get(name)


def running_models(client: httpx.Client) -> list[JSONObject]:
    """The server's loaded models (its ``/api/ps``); closes the client."""
    try:
        answer = client.get("/api/ps")
    finally:
        client.close()
    if answer.status_code != 200:
        raise CLIError(_server_error(answer))
    return [JSONObject(m) for m in answer.json().get("models", [])]


def stop_model(client: httpx.Client, model: str) -> bool:
    """Ask the server to unload a model now; False when it has no such model. Closes the client."""
    try:
        answer = client.post("/api/generate", json={"model": model, "keep_alive": 0, "stream": False})
    finally:
        client.close()
    if answer.status_code == 404:
        return False
    if answer.status_code != 200:
        raise CLIError(_server_error(answer))
    return True


# --------------------------------------------------------------------------- run through a server


def _body(**fields: Any) -> dict[str, Any]:
    """A request body without the fields left unset (the server's defaults apply)."""
    return {name: value for name, value in fields.items() if value is not None}


def _messages_json(messages: Iterable[MessageLike] | None) -> list[dict[str, Any]] | None:
    return None if messages is None else [as_dict(Message.from_any(m)) for m in messages]


def _known_fields(cls: type[T], data: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of `data` that `cls` has (a newer server may send more)."""
    names = {field.name for field in attrs.fields(cast("type[attrs.AttrsInstance]", cls))}
    return {name: value for name, value in data.items() if name in names}


class RemoteModels:
    """The calls ``run`` makes (see `Models`), spoken to a running server in Ollama's API.

    Answers come back as the Engine's own types; a failure as the server words it.
    """

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def __enter__(self) -> RemoteModels:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.client.close()

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        # No time limit: the server may first load (or create) a model, which takes as long as it takes.
        answer = self.client.post(path, json=body, timeout=None)
        if answer.status_code != 200:
            raise _failure(answer)
        return answer.json()

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The NDJSON lines of a streamed answer; leaving early closes the connection, which stops the request."""
        with self.client.stream("POST", path, json={**body, "stream": True}, timeout=None) as answer:
            if answer.status_code != 200:
                answer.read()
                raise _failure(answer)
            for line in answer.iter_lines():
                if not line.strip():
                    continue
                data = json.loads(line)
                if "error" in data:
                    raise CLIError(str(data["error"]))
                yield data

    def show(self, model: str) -> ShowResponse:
        data = self._post("/api/show", {"model": model})
        return ShowResponse(
            modified_at=parse_time(data.get("modified_at")) or _dt.datetime.now(_dt.timezone.utc),
            template=data.get("template") or "",
            modelfile=data.get("modelfile") or "",
            license=data.get("license") or "",
            details=cast("ModelDetails", JSONObject(data.get("details") or {})),  # read by attribute only
            modelinfo=data.get("model_info") or {},
            parameters=data.get("parameters") or "",
            capabilities=list(data.get("capabilities") or ()),
            system=data.get("system") or "",
            messages=list(data.get("messages") or ()),
        )

    def generate(
        self,
        model: str,
        prompt: str | None = None,
        *,
        format: str | None = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        think: bool | str | None = None,
        stream: Literal[True],
    ) -> Iterator[GenerateResponse]:
        body = _body(model=model, prompt=prompt, format=format, options=options, keep_alive=keep_alive, think=think)
        for data in self._stream("/api/generate", body):
            yield GenerateResponse(**_known_fields(GenerateResponse, data))

    def chat(
        self,
        model: str,
        messages: Iterable[MessageLike] | None = None,
        *,
        format: str | None = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        think: bool | str | None = None,
        stream: Literal[True],
    ) -> Iterator[ChatResponse]:
        body = _body(
            model=model,
            messages=_messages_json(messages) or [],
            format=format,
            options=options,
            keep_alive=keep_alive,
            think=think,
        )
        for data in self._stream("/api/chat", body):
            message = Message.from_any(data.get("message") or {"role": "assistant"})
            yield ChatResponse(**{**_known_fields(ChatResponse, data), "message": message})

    def embed(
        self,
        model: str,
        input: str | Sequence[str],
        truncate: bool | None = True,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        dimensions: int | None = None,
    ) -> EmbedResponse:
        body = _body(
            model=model, input=input, truncate=truncate, options=options, keep_alive=keep_alive, dimensions=dimensions
        )
        return EmbedResponse(**_known_fields(EmbedResponse, self._post("/api/embed", body)))

    def create(
        self,
        model: str,
        *,
        from_: str | None = None,
        system: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        messages: Iterable[MessageLike] | None = None,
    ) -> ProgressResponse:
        body = _body(
            model=model,
            system=system,
            parameters=parameters,
            messages=_messages_json(messages),
            stream=False,
            **{"from": from_},
        )
        return ProgressResponse.from_event(self._post("/api/create", body))
