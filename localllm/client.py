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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, Literal, NoReturn, ParamSpec, TypeVar, overload

import anyio.from_thread

from .engine import Engine, ProgressCallback
from .errors import EngineClosed
from .stream import ChunkStream

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

    from .embeddings import EmbeddingsResponse, EmbedResponse
    from .options import OptionValues
    from .runner.backend import Backend
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
    "show",
]

T = TypeVar("T")
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

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        models: str | os.PathLike[str] | None = None,
        num_parallel: int | None = None,
        max_loaded_models: int | None = None,
        max_queue: int | None = None,
        keep_alive: float | str | None = None,
        kv_cache_type: str | None = None,
        flash_attention: bool | None = None,
        repack: bool | None = None,
        prompt_cache: bool | str | os.PathLike[str] | None = None,
        prompt_cache_size: int | None = None,
        isolation: str | None = None,
        devices: Any = None,
        backend: Backend | None = None,
    ) -> None:
        self._engine = Engine(
            home,
            models=models,
            num_parallel=num_parallel,
            max_loaded_models=max_loaded_models,
            max_queue=max_queue,
            keep_alive=keep_alive,
            kv_cache_type=kv_cache_type,
            flash_attention=flash_attention,
            repack=repack,
            prompt_cache=prompt_cache,
            prompt_cache_size=prompt_cache_size,
            isolation=isolation,
            devices=devices,
            backend=backend,
        )
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
    def generate(
        self,
        model: str,
        prompt: str | None = None,
        suffix: str | None = None,
        *,
        system: str | None = None,
        template: str | None = None,
        context: Sequence[int] | None = None,
        raw: bool = False,
        format: str | Mapping[str, Any] | None = None,
        images: Sequence[Any] | None = None,
        options: OptionValues | ModelDumpable | None = None,
        keep_alive: float | str | None = None,
        think: bool | str | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        truncate: bool = True,
        shift: bool = True,
        stream: Literal[False] = False,
    ) -> GenerateResponse: ...

    @overload
    def generate(
        self,
        model: str,
        prompt: str | None = None,
        suffix: str | None = None,
        *,
        system: str | None = None,
        template: str | None = None,
        context: Sequence[int] | None = None,
        raw: bool = False,
        format: str | Mapping[str, Any] | None = None,
        images: Sequence[Any] | None = None,
        options: OptionValues | ModelDumpable | None = None,
        keep_alive: float | str | None = None,
        think: bool | str | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        truncate: bool = True,
        shift: bool = True,
        stream: Literal[True],
    ) -> Iterator[GenerateResponse]: ...

    @overload
    def generate(
        self,
        model: str,
        prompt: str | None = None,
        suffix: str | None = None,
        *,
        system: str | None = None,
        template: str | None = None,
        context: Sequence[int] | None = None,
        raw: bool = False,
        format: str | Mapping[str, Any] | None = None,
        images: Sequence[Any] | None = None,
        options: OptionValues | ModelDumpable | None = None,
        keep_alive: float | str | None = None,
        think: bool | str | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        truncate: bool = True,
        shift: bool = True,
        stream: bool,
    ) -> GenerateResponse | Iterator[GenerateResponse]: ...

    def generate(
        self,
        model: str,
        prompt: str | None = None,
        suffix: str | None = None,
        *,
        system: str | None = None,
        template: str | None = None,
        context: Sequence[int] | None = None,
        raw: bool = False,
        format: str | Mapping[str, Any] | None = None,
        images: Sequence[Any] | None = None,
        options: OptionValues | ModelDumpable | None = None,
        keep_alive: float | str | None = None,
        think: bool | str | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        truncate: bool = True,
        shift: bool = True,
        stream: bool = False,
    ) -> GenerateResponse | Iterator[GenerateResponse]:
        """Complete a prompt: the whole response, or with ``stream=True`` an iterator of chunks."""
        response = self._engine.generate(
            model,
            prompt,
            suffix,
            system=system,
            template=template,
            context=context,
            raw=raw,
            format=format,
            images=images,
            options=options,
            keep_alive=keep_alive,
            think=think,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            truncate=truncate,
            shift=shift,
            stream=stream,
        )
        if isinstance(response, ChunkStream):
            return self._iterate(response)
        return self._call(lambda: response)

    @overload
    def chat(
        self,
        model: str,
        messages: Iterable[MessageLike] | None = None,
        *,
        tools: Sequence[Any] | None = None,
        format: str | Mapping[str, Any] | None = None,
        options: OptionValues | ModelDumpable | None = None,
        keep_alive: float | str | None = None,
        think: bool | str | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        truncate: bool = True,
        shift: bool = True,
        stream: Literal[False] = False,
    ) -> ChatResponse: ...

    @overload
    def chat(
        self,
        model: str,
        messages: Iterable[MessageLike] | None = None,
        *,
        tools: Sequence[Any] | None = None,
        format: str | Mapping[str, Any] | None = None,
        options: OptionValues | ModelDumpable | None = None,
        keep_alive: float | str | None = None,
        think: bool | str | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        truncate: bool = True,
        shift: bool = True,
        stream: Literal[True],
    ) -> Iterator[ChatResponse]: ...

    @overload
    def chat(
        self,
        model: str,
        messages: Iterable[MessageLike] | None = None,
        *,
        tools: Sequence[Any] | None = None,
        format: str | Mapping[str, Any] | None = None,
        options: OptionValues | ModelDumpable | None = None,
        keep_alive: float | str | None = None,
        think: bool | str | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        truncate: bool = True,
        shift: bool = True,
        stream: bool,
    ) -> ChatResponse | Iterator[ChatResponse]: ...

    def chat(
        self,
        model: str,
        messages: Iterable[MessageLike] | None = None,
        *,
        tools: Sequence[Any] | None = None,
        format: str | Mapping[str, Any] | None = None,
        options: OptionValues | ModelDumpable | None = None,
        keep_alive: float | str | None = None,
        think: bool | str | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        truncate: bool = True,
        shift: bool = True,
        stream: bool = False,
    ) -> ChatResponse | Iterator[ChatResponse]:
        """Continue a conversation: the whole response, or with ``stream=True`` an iterator of chunks."""
        response = self._engine.chat(
            model,
            messages,
            tools=tools,
            format=format,
            options=options,
            keep_alive=keep_alive,
            think=think,
            tool_choice=tool_choice,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            truncate=truncate,
            shift=shift,
            stream=stream,
        )
        if isinstance(response, ChunkStream):
            return self._iterate(response)
        return self._call(lambda: response)

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
        return self._call(lambda: self._engine.embed(model, input, truncate, options, keep_alive, dimensions))

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
        self,
        model: str,
        *,
        from_: str | os.PathLike[str] | None = None,
        files: Mapping[str, str] | None = None,
        adapters: Mapping[str, str] | None = None,
        template: str | None = None,
        system: str | None = None,
        parameters: Mapping[str, Any] | ModelDumpable | None = None,
        messages: Iterable[MessageLike] | None = None,
        license: str | Sequence[str] | None = None,
        quantize: str | None = None,
        modelfile: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None,
        stream: Literal[False] = False,
    ) -> ProgressResponse: ...

    @overload
    def create(
        self,
        model: str,
        *,
        from_: str | os.PathLike[str] | None = None,
        files: Mapping[str, str] | None = None,
        adapters: Mapping[str, str] | None = None,
        template: str | None = None,
        system: str | None = None,
        parameters: Mapping[str, Any] | ModelDumpable | None = None,
        messages: Iterable[MessageLike] | None = None,
        license: str | Sequence[str] | None = None,
        quantize: str | None = None,
        modelfile: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None,
        stream: Literal[True],
    ) -> Iterator[ProgressResponse]: ...

    @overload
    def create(
        self,
        model: str,
        *,
        from_: str | os.PathLike[str] | None = None,
        files: Mapping[str, str] | None = None,
        adapters: Mapping[str, str] | None = None,
        template: str | None = None,
        system: str | None = None,
        parameters: Mapping[str, Any] | ModelDumpable | None = None,
        messages: Iterable[MessageLike] | None = None,
        license: str | Sequence[str] | None = None,
        quantize: str | None = None,
        modelfile: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None,
        stream: bool,
    ) -> ProgressResponse | Iterator[ProgressResponse]: ...

    def create(
        self,
        model: str,
        *,
        from_: str | os.PathLike[str] | None = None,
        files: Mapping[str, str] | None = None,
        adapters: Mapping[str, str] | None = None,
        template: str | None = None,
        system: str | None = None,
        parameters: Mapping[str, Any] | ModelDumpable | None = None,
        messages: Iterable[MessageLike] | None = None,
        license: str | Sequence[str] | None = None,
        quantize: str | None = None,
        modelfile: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None,
        stream: bool = False,
    ) -> ProgressResponse | Iterator[ProgressResponse]:
        """Create a model (see `Engine.create`): the final status, or with ``stream=True`` an iterator of progress."""
        result = self._call(
            lambda: self._engine.create(
                model,
                from_=from_,
                files=files,
                adapters=adapters,
                template=template,
                system=system,
                parameters=parameters,
                messages=messages,
                license=license,
                quantize=quantize,
                modelfile=modelfile,
                progress=progress,
                stream=stream,
            )
        )
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
