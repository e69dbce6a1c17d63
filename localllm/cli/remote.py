"""The server a command talks to: where it is (``$LOCALLLM_HOST``, else ``$OLLAMA_HOST``), whether it answers,
and `RemoteModels`, the commands' calls spoken to it in Ollama's REST API.

The server may be ``localllm serve`` or Ollama itself.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import ipaddress
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast, overload

import attrs

from .. import EmbedResponse
from ..errors import ModelNotFound
from ..request import ChatRequest, EmbedRequest, Request, as_json
from ..types import (
    ChatResponse,
    GenerateResponse,
    ListResponse,
    Message,
    ModelDetails,
    ProcessModel,
    ProcessResponse,
    ProgressResponse,
    ShowResponse,
    StatusResponse,
    StoredModel,
    as_dict,
    combine_chat,
    combine_generate,
)
from .errors import CLIError
from .format import parse_time
from .upload import modelfile_request

if TYPE_CHECKING:
    import httpx

    from ..types import MessageLike

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "ProgressCallback",
    "RemoteModels",
    "find_server",
    "host_setting",
    "parse_host",
    "server_url",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
#: Seconds to wait for a server to take a connection, and to answer the first question: a refused connection
#: fails at once, a host that takes connections but never answers fails after this.
ANSWER_TIMEOUT = 3.0

T = TypeVar("T")
R = TypeVar("R")
ProgressCallback = Callable[[dict[str, Any]], Any]


# --------------------------------------------------------------------------- where the server is


def host_setting() -> tuple[str, str] | None:
    """The variable naming the server's address and its value: ``LOCALLLM_HOST``, else ``OLLAMA_HOST``; or None."""
    for name in ("LOCALLLM_HOST", "OLLAMA_HOST"):
        value = os.environ.get(name, "").strip()
        if value:
            return name, value
    return None


def _split_host(value: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of a host setting, read as Ollama reads ``OLLAMA_HOST``.

    ``host``, ``host:port``, ``[v6]:port``, ``:port`` or a URL; the port defaults to 11434, or to 80 and 443
    for a URL written with ``http://`` or ``https://``. ValueError for a port that is not one.
    """
    text = value.strip()
    scheme, written, rest = text.partition("://")
    if written:
        scheme = scheme.lower()
        port = {"http": 80, "https": 443}.get(scheme, DEFAULT_PORT)
    else:
        scheme, rest, port = "http", text, DEFAULT_PORT
    hostport, _, path = rest.partition("/")
    if hostport.startswith("["):
        host, _, after = hostport[1:].partition("]")
        port_text = after.removeprefix(":")
    elif hostport.count(":") == 1:
        host, port_text = hostport.split(":")
    else:
        host, port_text = hostport, ""  # a name, or a bare IPv6 address
    if port_text:
        if not port_text.isdigit() or int(port_text) > 65535:
            raise ValueError(f"{port_text!r} is not a port number")
        port = int(port_text)
    return scheme, host or DEFAULT_HOST, port, path.strip("/")


def parse_host(value: str) -> tuple[str, int]:
    """Host and port from a host setting (see `_split_host`); ValueError for a bad port."""
    _scheme, host, port, _path = _split_host(value)
    return host, port


def server_url(value: str) -> str:
    """The base URL of the server a host setting names, e.g. ``http://127.0.0.1:11434``."""
    scheme, host, port, path = _split_host(value)
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}" + (f"/{path}" if path else "")


def _is_loopback(url: str) -> bool:
    host = _split_host(url)[1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def not_answering(url: str) -> CLIError:
    return CLIError(
        f"could not connect to the localllm server at {url} "
        "(is `localllm serve` running? --local runs the command in this process)"
    )


def find_server() -> RemoteModels | None:
    """The server the commands use: the one the host setting names, else one answering on 127.0.0.1:11434.

    None when no host is set and nothing answers on the default port (the command then runs in this process);
    a set host that does not answer is an error, never a reason to run elsewhere.
    """
    setting = host_setting()
    if setting is None:
        return RemoteModels.connect(f"http://{DEFAULT_HOST}:{DEFAULT_PORT}")
    variable, value = setting
    try:
        url = server_url(value)
    except ValueError as exc:
        raise CLIError(f"invalid {variable} {value!r}: {exc}") from None
    server = RemoteModels.connect(url)
    if server is None:
        raise not_answering(url)
    return server


# --------------------------------------------------------------------------- reading answers


def _server_error(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error") or response.text)
    except ValueError:
        return response.text or f"HTTP {response.status_code}"


def _failure(response: httpx.Response) -> Exception:
    """The error a failed answer stands for: not found as the Engine says it, anything else as the server said it."""
    message = _server_error(response)
    return ModelNotFound(message) if response.status_code == 404 else CLIError(message)


def _body(**fields: Any) -> dict[str, Any]:
    """A request body without the fields left unset (the server's defaults apply)."""
    return {name: value for name, value in fields.items() if value is not None}


def _messages_json(messages: Iterable[MessageLike] | None) -> list[dict[str, Any]] | None:
    return None if messages is None else [as_dict(Message.from_any(m)) for m in messages]


def _known_fields(cls: type[T], data: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of `data` that `cls` has (a newer server may send more)."""
    names = {field.name for field in attrs.fields(cast("type[attrs.AttrsInstance]", cls))}
    return {name: value for name, value in data.items() if name in names}


def _details(data: Mapping[str, Any] | None) -> ModelDetails:
    fields = _known_fields(ModelDetails, data or {})
    if fields.get("families") is not None:
        fields["families"] = tuple(fields["families"])
    return ModelDetails(**fields)


_NEVER = _dt.datetime(1, 1, 1, tzinfo=_dt.timezone.utc)  # what a missing time reads as ("Never")


# --------------------------------------------------------------------------- the server's models


class RemoteModels:
    """The calls the commands make (see `Models`), spoken to a running server in Ollama's API.

    Answers come back as the Engine's own types; a failure as the server words it.
    """

    def __init__(self, client: httpx.Client, url: str) -> None:
        self.client = client
        self.url = url

    @classmethod
    def connect(cls, url: str) -> RemoteModels | None:
        """The server at `url` when it answers as Ollama's API does within `ANSWER_TIMEOUT`, else None."""
        import httpx

        # No time limit on answers once connected: a server may first load (or create) a model.
        # Proxies are for other hosts: this machine's own server is reached directly, as Ollama's client does.
        client = httpx.Client(
            base_url=url, timeout=httpx.Timeout(None, connect=ANSWER_TIMEOUT), trust_env=not _is_loopback(url)
        )
        try:
            answer = client.get("/", timeout=ANSWER_TIMEOUT)
            if answer.status_code == 200 and "running" in answer.text:
                return cls(client, url)
        except httpx.HTTPError:
            pass
        client.close()
        return None

    def __enter__(self) -> RemoteModels:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.client.close()

    @contextlib.contextmanager
    def _talking(self) -> Iterator[None]:
        """A connection that fails on the way is an error saying so, not a traceback."""
        import httpx

        try:
            yield
        except httpx.ConnectError:
            raise not_answering(self.url) from None
        except httpx.TransportError as exc:
            raise CLIError(f"lost the connection to the server at {self.url}: {exc or type(exc).__name__}") from None

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        with self._talking():
            answer = self.client.request(method, path, json=body)
        if answer.status_code not in (200, 201):
            raise _failure(answer)
        return answer

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The NDJSON lines of a streamed answer; leaving early closes the connection, which stops the request."""
        with self._talking(), self.client.stream("POST", path, json={**body, "stream": True}) as answer:
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

    def _progress(self, path: str, body: dict[str, Any], progress: ProgressCallback | None) -> ProgressResponse:
        last: dict[str, Any] = {"status": "success"}
        for event in self._stream(path, body):
            if progress is not None:
                progress(event)
            last = event
        return ProgressResponse.from_event(last)

    # -- the store

    def list(self) -> ListResponse:
        data = self._request("GET", "/api/tags").json()
        models = [
            StoredModel(
                model=str(m.get("model") or m.get("name") or ""),
                name=str(m.get("name") or m.get("model") or ""),
                modified_at=parse_time(m.get("modified_at")) or _NEVER,
                digest=str(m.get("digest") or ""),
                size=int(m.get("size") or 0),
                details=_details(m.get("details")),
                capabilities=[str(c) for c in m.get("capabilities") or ()],
            )
            for m in data.get("models") or ()
        ]
        return ListResponse(models=models)

    def show(self, model: str, *, verbose: bool = False) -> ShowResponse:
        data = self._request("POST", "/api/show", _body(model=model, verbose=verbose or None)).json()
        return ShowResponse(
            modified_at=parse_time(data.get("modified_at")) or _NEVER,
            template=data.get("template") or "",
            modelfile=data.get("modelfile") or "",
            license=data.get("license") or "",
            details=_details(data.get("details")),
            modelinfo=data.get("model_info") or {},
            parameters=data.get("parameters") or "",
            capabilities=list(data.get("capabilities") or ()),
            system=data.get("system") or "",
            messages=list(data.get("messages") or ()),
            tensors=[
                ShowResponse.Tensor(str(t.get("name") or ""), str(t.get("type") or ""), list(t.get("shape") or ()))
                for t in data.get("tensors") or ()
                if isinstance(t, dict)
            ],
            projector_info=data.get("projector_info") or None,
        )

    def ps(self) -> ProcessResponse:
        data = self._request("GET", "/api/ps").json()
        models = [
            ProcessModel(
                name=str(m.get("name") or m.get("model") or ""),
                model=str(m.get("model") or m.get("name") or ""),
                size=int(m.get("size") or 0),
                size_vram=int(m.get("size_vram") or 0),
                digest=str(m.get("digest") or ""),
                details=_details(m.get("details")),
                expires_at=parse_time(m.get("expires_at")),
                context_length=int(m.get("context_length") or 0),
            )
            for m in data.get("models") or ()
        ]
        return ProcessResponse(models=models)

    def copy(self, source: str, destination: str) -> StatusResponse:
        self._request("POST", "/api/copy", {"source": source, "destination": destination})
        return StatusResponse(status="success")

    def delete(self, model: str) -> StatusResponse:
        self._request("DELETE", "/api/delete", {"model": model})
        return StatusResponse(status="success")

    def pull(self, model: str, *, insecure: bool = False, progress: ProgressCallback | None = None) -> ProgressResponse:
        return self._progress("/api/pull", _body(model=model, insecure=insecure or None), progress)

    def create(
        self,
        model: str,
        *,
        from_: str | None = None,
        system: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        messages: Iterable[MessageLike] | None = None,
        quantize: str | None = None,
        modelfile: os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> ProgressResponse:
        """Create a model on the server; the files a Modelfile names are uploaded first, as blobs."""
        body = _body(
            model=model,
            system=system,
            parameters=parameters,
            messages=_messages_json(messages),
            quantize=quantize,
            **{"from": from_},
        )
        if modelfile is not None:
            fields, uploads = modelfile_request(Path(modelfile))
            for digest, path in uploads.items():
                self._upload(digest, path, progress)
            body.update(fields)
        return self._progress("/api/create", body, progress)

    def _upload(self, digest: str, path: Path, progress: ProgressCallback | None) -> None:
        """Send a file to the server's blobs, unless it has it already; reports progress as copying it."""
        with self._talking():
            if self.client.head(f"/api/blobs/{digest}").status_code == 200:
                return
        size = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            done = 0
            with path.open("rb") as file:
                while chunk := file.read(1 << 20):
                    done += len(chunk)
                    if progress is not None:
                        progress(
                            {"status": f"copying file {digest}", "digest": digest, "total": size, "completed": done}
                        )
                    yield chunk

        with self._talking():
            answer = self.client.post(f"/api/blobs/{digest}", content=chunks(), headers={"Content-Length": str(size)})
        if answer.status_code not in (200, 201):
            raise CLIError(f"uploading {path}: {_server_error(answer)}")

    # -- models at work

    @overload
    def send(self, request: Request[R], *, stream: Literal[False] = False) -> R: ...

    @overload
    def send(self, request: Request[R], *, stream: Literal[True]) -> Iterator[R]: ...

    def send(self, request: Request[Any], *, stream: bool = False) -> Any:
        """Run a request on the server: its whole response, or with `stream` an iterator of its chunks."""
        body = as_json(request)
        if isinstance(request, EmbedRequest):
            answer = EmbedResponse(**_known_fields(EmbedResponse, self._request("POST", "/api/embed", body).json()))
            return iter([answer]) if stream else answer
        chunks = self._chunks(request, body)
        if stream:
            return chunks
        collected = list(chunks)
        return combine_chat(collected) if isinstance(request, ChatRequest) else combine_generate(collected)

    def _chunks(self, request: Request[Any], body: dict[str, Any]) -> Iterator[Any]:
        if isinstance(request, ChatRequest):
            for data in self._stream("/api/chat", body):
                message = Message.from_any(data.get("message") or {"role": "assistant"})
                yield ChatResponse(**{**_known_fields(ChatResponse, data), "message": message})
        else:
            for data in self._stream("/api/generate", body):
                yield GenerateResponse(**_known_fields(GenerateResponse, data))
