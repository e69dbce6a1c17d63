"""The synchronous API: `Client`, the surface of the ollama client's `Client`, over an `Engine`.

The engine runs on an event loop in a thread the client owns, so a client works the same from a
plain script, from any thread, and from a notebook cell (where the main thread's loop is busy)::

    client = localllm.Client()
    reply = client.chat("smollm2", [{"role": "user", "content": "hi"}])
    for chunk in client.chat("smollm2", [{"role": "user", "content": "hi"}], stream=True):
        print(chunk.message.content, end="")

`localllm.chat(...)`, `localllm.generate(...)`, `localllm.list()`, ... call a default client,
created on first use, as ``ollama.chat(...)`` does.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Concatenate, Literal, NoReturn, ParamSpec, TypeVar, overload

import anyio.from_thread

from .engine import Engine, EngineArguments, ProgressCallback
from .errors import EngineClosed
from .request import ChatRequest, EmbedRequest, GenerateRequest, Request, takes_fields_of
from .stream import ChunkStream

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal
    from typing_extensions import Unpack

    from .embeddings import EmbeddingsResponse, EmbedResponse
    from .options import OptionValues
    from .request import ChatFields, CreateFields, GenerateFields
    from .types import (
        ChatResponse,
        GenerateResponse,
        ListResponse,
        MessageLike,
        ModelDumpable,
        ProcessResponse,
        ProgressResponse,
        ShowResponse,
        StatusResponse,
    )

__all__ = [
    "Client",
    "chat",
    "copy",
    "create",
    "create_blob",
    "default_client",
    "delete",
    "embed",
    "embeddings",
    "generate",
    "list",
    "ps",
    "pull",
    "push",
    "send",
    "show",
]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")


async def _next(chunks: AsyncIterator[T]) -> tuple[T] | None:
    """The next chunk (in a tuple, as a chunk may be anything), or None at the end."""
    try:
        return (await chunks.__anext__(),)
    except StopAsyncIteration:
        return None


def _shut_down(portal: BlockingPortal, engine: Engine, loop_thread: contextlib.ExitStack) -> None:
    """Close the engine (unloading its models, joining its threads), then stop the loop's thread."""
    try:
        portal.call(engine.aclose)
    finally:
        loop_thread.close()


class Client:
    """Runs local models, called synchronously; the ollama client's `Client`, without a server.

    It takes the `Engine`'s settings. Close it (or use it as a context manager) to unload
    its models; one left open is closed when it is garbage-collected or the interpreter exits.
    Streaming calls return plain iterators; ``progress`` callbacks run on the client's loop thread.
    """

    @takes_fields_of(Engine)
    def __init__(self, home: str | os.PathLike[str] | None = None, **settings: Unpack[EngineArguments]) -> None:
        self._engine = Engine(home, **settings)
        loop_thread = contextlib.ExitStack()
        self._portal = loop_thread.enter_context(anyio.from_thread.start_blocking_portal(name="localllm-client"))
        # Runs once: on close(), on garbage collection, or at interpreter exit (before daemon threads die).
        self._finalizer = weakref.finalize(self, _shut_down, self._portal, self._engine, loop_thread)

    # -- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        """Unload every model, join every worker thread and stop the event loop's thread."""
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, func: Callable[[], Awaitable[T]]) -> T:
        """Await `func()` on the client's event loop; Ctrl-C cancels it there (freeing its slot) and re-raises."""
        if not self._finalizer.alive:
            raise EngineClosed("this client is closed")
        future = self._portal.start_task_soon(func)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            with contextlib.suppress(BaseException):
                future.result(timeout=30)
            raise

    def _iterate(self, chunks: ChunkStream[T]) -> Iterator[T]:
        """`chunks` as a plain iterator; leaving the loop early stops the request."""
        try:
            while (item := self._call(lambda: _next(chunks))) is not None:
                yield item[0]
        finally:
            with contextlib.suppress(RuntimeError):  # the client was closed first
                self._portal.call(chunks.aclose)

    # -- generation ----------------------------------------------------------------

    @overload
    def send(self, request: Request[R], *, stream: Literal[False] = False) -> R: ...

    @overload
    def send(self, request: Request[R], *, stream: Literal[True]) -> Iterator[R]: ...

    @overload
    def send(self, request: Request[R], *, stream: bool) -> R | Iterator[R]: ...

    def send(self, request: Request[R], *, stream: bool = False) -> R | Iterator[R]:
        """Run a request (`GenerateRequest`, `ChatRequest` or `EmbedRequest`): its whole response, or
        with ``stream=True`` an iterator of its chunks (leaving the loop early stops the request)."""
        if stream:
            return self._iterate(self._engine.send(request, stream=True))
        response = self._engine.send(request)
        return self._call(lambda: response)

    @overload
    def generate(
        self,
        model: str,
        prompt: str | None = None,
        suffix: str | None = None,
        *,
        stream: Literal[False] = False,
        **fields: Unpack[GenerateFields],
    ) -> GenerateResponse: ...

    @overload
    def generate(
        self,
        model: str,
        prompt: str | None = None,
        suffix: str | None = None,
        *,
        stream: Literal[True],
        **fields: Unpack[GenerateFields],
    ) -> Iterator[GenerateResponse]: ...

    @overload
    def generate(
        self,
        model: str,
        prompt: str | None = None,
        suffix: str | None = None,
        *,
        stream: bool,
        **fields: Unpack[GenerateFields],
    ) -> GenerateResponse | Iterator[GenerateResponse]: ...

    @takes_fields_of(GenerateRequest)
    def generate(
        self,
        model: str,
        prompt: str | None = None,
        suffix: str | None = None,
        *,
        stream: bool = False,
        **fields: Unpack[GenerateFields],
    ) -> GenerateResponse | Iterator[GenerateResponse]:
        """As `Engine.generate`: the whole response, or with ``stream=True`` an iterator of chunks."""
        return self.send(GenerateRequest(model, prompt, suffix=suffix, **fields), stream=stream)

    @overload
    def chat(
        self,
        model: str,
        messages: Iterable[MessageLike] | None = None,
        *,
        stream: Literal[False] = False,
        **fields: Unpack[ChatFields],
    ) -> ChatResponse: ...

    @overload
    def chat(
        self,
        model: str,
        messages: Iterable[MessageLike] | None = None,
        *,
        stream: Literal[True],
        **fields: Unpack[ChatFields],
    ) -> Iterator[ChatResponse]: ...

    @overload
    def chat(
        self,
        model: str,
        messages: Iterable[MessageLike] | None = None,
        *,
        stream: bool,
        **fields: Unpack[ChatFields],
    ) -> ChatResponse | Iterator[ChatResponse]: ...

    @takes_fields_of(ChatRequest)
    def chat(
        self,
        model: str,
        messages: Iterable[MessageLike] | None = None,
        *,
        stream: bool = False,
        **fields: Unpack[ChatFields],
    ) -> ChatResponse | Iterator[ChatResponse]:
        """As `Engine.chat`: the whole response, or with ``stream=True`` an iterator of chunks."""
        return self.send(ChatRequest(model, messages, **fields), stream=stream)

    def embed(
        self,
        model: str,
        input: str | Sequence[str],
        truncate: bool | None = True,
        options: OptionValues | ModelDumpable | None = None,
        keep_alive: float | str | None = None,
        dimensions: int | None = None,
    ) -> EmbedResponse:
        """Embed one text or several (packed into one batch); vectors are L2-normalised."""
        request = EmbedRequest(
            model, input, truncate=truncate is not False, options=options, keep_alive=keep_alive, dimensions=dimensions
        )
        return self.send(request)

    def embeddings(
        self,
        model: str,
        prompt: str,
        options: OptionValues | ModelDumpable | None = None,
        keep_alive: float | str | None = None,
    ) -> EmbeddingsResponse:
        """The legacy single-prompt embedding call (field `embedding`, not normalised)."""
        return self._call(lambda: self._engine.embeddings(model, prompt, options, keep_alive))

    # -- the model store ---------------------------------------------------------------

    @overload
    def pull(
        self,
        model: str,
        *,
        insecure: bool = False,
        progress: ProgressCallback | None = None,
        stream: Literal[False] = False,
    ) -> ProgressResponse: ...

    @overload
    def pull(
        self, model: str, *, insecure: bool = False, progress: ProgressCallback | None = None, stream: Literal[True]
    ) -> Iterator[ProgressResponse]: ...

    @overload
    def pull(
        self, model: str, *, insecure: bool = False, progress: ProgressCallback | None = None, stream: bool
    ) -> ProgressResponse | Iterator[ProgressResponse]: ...

    def pull(
        self,
        model: str,
        *,
        insecure: bool = False,
        progress: ProgressCallback | None = None,
        stream: bool = False,
    ) -> ProgressResponse | Iterator[ProgressResponse]:
        """Download a model: the final status, or with ``stream=True`` an iterator of progress."""
        result = self._call(lambda: self._engine.pull(model, insecure=insecure, progress=progress, stream=stream))
        return self._iterate(result) if isinstance(result, ChunkStream) else result

    def push(self, model: str, *, insecure: bool = False, stream: bool = False) -> NoReturn:
        """Not supported: localllm does not upload models to a registry."""
        self._call(lambda: self._engine.push(model, insecure=insecure, stream=stream))

    @overload
    def create(
        self, model: str, *, stream: Literal[False] = False, **fields: Unpack[CreateFields]
    ) -> ProgressResponse: ...

    @overload
    def create(
        self, model: str, *, stream: Literal[True], **fields: Unpack[CreateFields]
    ) -> Iterator[ProgressResponse]: ...

    @overload
    def create(
        self, model: str, *, stream: bool, **fields: Unpack[CreateFields]
    ) -> ProgressResponse | Iterator[ProgressResponse]: ...

    @takes_fields_of(Engine.create)
    def create(
        self, model: str, *, stream: bool = False, **fields: Unpack[CreateFields]
    ) -> ProgressResponse | Iterator[ProgressResponse]:
        """Create a model (see `Engine.create`): the final status, or with ``stream=True`` an iterator of progress."""
        result = self._call(lambda: self._engine.create(model, stream=stream, **fields))
        return self._iterate(result) if isinstance(result, ChunkStream) else result

    def create_blob(self, path: str | os.PathLike[str]) -> str:
        """Add a file to the store under its sha256 digest; the digest is for `create(files=...)`."""
        return self._call(lambda: self._engine.create_blob(path))

    def list(self) -> ListResponse:
        """The models in the store (`.models`), most recently modified first."""
        return self._call(self._engine.list)

    def show(self, model: str, *, verbose: bool = False) -> ShowResponse:
        """Details of a model: modelfile, parameters, template, details, modelinfo, capabilities, ..."""
        return self._call(lambda: self._engine.show(model, verbose=verbose))

    def ps(self) -> ProcessResponse:
        """The loaded models (`.models`)."""
        return self._call(self._engine.ps)

    def copy(self, source: str, destination: str) -> StatusResponse:
        return self._call(lambda: self._engine.copy(source, destination))

    def delete(self, model: str) -> StatusResponse:
        """Delete a model (unloading it first) and the blobs nothing else uses."""
        return self._call(lambda: self._engine.delete(model))


# --------------------------------------------------------------------------- the default client

_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The client the module-level functions use, created on first use with the default settings."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def _on_default_client(method: Callable[Concatenate[Client, P], T]) -> Callable[P, T]:
    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        return method(default_client(), *args, **kwargs)

    signature = inspect.signature(method)
    call.__signature__ = signature.replace(parameters=tuple(signature.parameters.values())[1:])  # type: ignore[attr-defined]
    call.__qualname__ = call.__name__
    return call


send = _on_default_client(Client.send)
generate = _on_default_client(Client.generate)
chat = _on_default_client(Client.chat)
embed = _on_default_client(Client.embed)
embeddings = _on_default_client(Client.embeddings)
pull = _on_default_client(Client.pull)
push = _on_default_client(Client.push)
create = _on_default_client(Client.create)
create_blob = _on_default_client(Client.create_blob)
list = _on_default_client(Client.list)
show = _on_default_client(Client.show)
ps = _on_default_client(Client.ps)
copy = _on_default_client(Client.copy)
delete = _on_default_client(Client.delete)
