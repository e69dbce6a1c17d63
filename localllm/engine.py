"""The Engine: the public facade. It wires the registry, the scheduler and the runners together.

Its methods take and return what the ollama client's `AsyncClient` does, so moving from it changes
one line: the constructor.
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import logging
import math
import os
import threading
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypedDict, TypeVar, overload

import anyio

from . import pipeline
from .embeddings import EmbeddingsResponse, EmbedResponse
from .embeddings import embed as embed_texts
from .embeddings import embeddings as embed_prompt
from .errors import InvalidRequest, LocalLLMError
from .files import sha256_of
from .media import MediaLimits
from .options import OptionValues
from .registry.create import CreateParts
from .request import (
    ChatFields,
    ChatRequest,
    CreateFields,
    EmbedRequest,
    GenerateFields,
    GenerateRequest,
    Request,
    takes_fields_of,
)
from .service import ModelService
from .settings import EngineSettings
from .stream import AnswerJob, ChunkStream, Job, ResponseStream, ThreadJob
from .types import (
    ChatResponse,
    GenerateResponse,
    ListResponse,
    Message,
    MessageLike,
    ModelDumpable,
    ProcessModel,
    ProcessResponse,
    ProgressResponse,
    ShowResponse,
    StatusResponse,
    as_dict,
    combine_chat,
    combine_generate,
    plain_data,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .registry.registry import Registry
    from .runner.backend import Backend
    from .runner.protocol import LoadConfig, ModelRunner
    from .scheduler.scheduler import Scheduler

__all__ = ["Engine", "EngineArguments", "ProgressCallback"]

logger = logging.getLogger("localllm")

ProgressCallback = Callable[[dict[str, Any]], Any]
"""Called in the event loop with each progress event of `pull`/`create` (a dict); may be async."""

Emit = Callable[[ProgressResponse], None]

T = TypeVar("T")
R = TypeVar("R")


def _last(chunks: Sequence[T]) -> T:
    return chunks[-1]


async def _open_embed(service: ModelService, request: EmbedRequest) -> Job[EmbedResponse]:
    return AnswerJob(functools.partial(embed_texts, service, request))


#: How each kind of request is opened on the model service, and how its chunks make its whole response.
_RUNS: dict[type[Request[Any]], tuple[Callable[[ModelService, Any], Awaitable[Job[Any]]], Callable[[Any], Any]]] = {
    GenerateRequest: (pipeline.open_generate, combine_generate),
    ChatRequest: (pipeline.open_chat, combine_chat),
    EmbedRequest: (_open_embed, _last),
}


def _wall_time(timestamp: float | None) -> dt.datetime | None:
    if timestamp is None:
        return None
    if math.isinf(timestamp):  # "forever", as Ollama shows it
        return dt.datetime(1 if timestamp < 0 else 2318, 1, 1, tzinfo=dt.timezone.utc)
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)


def _str_or_path(value: str | os.PathLike[str] | None) -> str | Path | None:
    return Path(value) if isinstance(value, os.PathLike) else value


async def _chunks_of(file: anyio.AsyncFile[bytes]) -> AsyncIterator[bytes]:
    while chunk := await file.read(4 << 20):
        yield chunk


class EngineArguments(TypedDict, total=False):
    """The keywords of `Engine(home, ...)`, for what passes them on (the sync `Client`, a Ray node)."""

    models: str | os.PathLike[str] | None
    num_parallel: int | None
    max_loaded_models: int | None
    max_queue: int | None
    keep_alive: float | str | None
    kv_cache_type: str | None
    flash_attention: bool | None
    repack: bool | None
    prompt_cache: bool | str | os.PathLike[str] | None
    prompt_cache_size: int | None
    isolation: str | None
    media_limits: MediaLimits | None
    devices: Any
    backend: Backend | None


class Engine:
    """Runs local models in this process.

    Use it as an async context manager; leaving the block unloads every model
    and joins every worker thread (or call `await engine.aclose()` yourself, as
    in a notebook)::

        async with localllm.Engine() as engine:
            async for chunk in engine.chat("smollm2", [{"role": "user", "content": "hi"}]):
                print(chunk.message.content, end="")
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
        media_limits: MediaLimits | None = None,
        devices: Any = None,
        backend: Backend | None = None,
    ) -> None:
        """`media_limits` bounds the images and audio a request may carry (by default `MediaLimits()`, or
        from ``LOCALLLM_MAX_*`` variables). `backend` replaces llama.cpp under the runners (tests and
        alternative kernels): any object with the `localllm.runner.backend.Backend` protocol. It serves
        runners in threads only."""
        settings = EngineSettings.resolve(
            home,
            models,
            num_parallel,
            max_loaded_models,
            max_queue,
            keep_alive,
            kv_cache_type,
            flash_attention,
            repack,
            prompt_cache,
            prompt_cache_size,
            isolation,
            media_limits,
        )
        self._service = ModelService(settings, devices=devices, backend=backend)
        # An engine dropped without aclose() (a notebook cell run again) must not keep its models loaded:
        # its runners are closed when it is garbage-collected, or at exit.
        self._finalizer = weakref.finalize(self, self._service.release)

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Unload every model and join every worker thread. The engine cannot be used afterwards."""
        self._finalizer.detach()
        await self._service.close()

    @property
    def settings(self) -> EngineSettings:
        return self._service.settings

    @property
    def scheduler(self) -> Scheduler[LoadConfig, ModelRunner]:
        """The scheduler, created on first use (inside the event loop)."""
        return self._service.scheduler

    @property
    def registry(self) -> Registry:
        return self._service.registry

    # -- generation ----------------------------------------------------------------

    @overload
    def send(self, request: Request[R], *, stream: Literal[False] = False) -> ResponseStream[R]: ...

    @overload
    def send(self, request: Request[R], *, stream: Literal[True]) -> ChunkStream[R]: ...

    @overload
    def send(self, request: Request[R], *, stream: bool) -> ResponseStream[R] | ChunkStream[R]: ...

    def send(self, request: Request[Any], *, stream: bool = False) -> ResponseStream[Any] | ChunkStream[Any]:
        """Run a request (`GenerateRequest`, `ChatRequest` or `EmbedRequest`). Iterate the result for
        chunks, or await it for the whole response; with ``stream=True``, awaiting gives an async
        iterator of chunks. Nothing runs until then, and it runs once.

        `generate`, `chat` and `embed` build a request and send it."""
        if type(request) not in _RUNS:
            raise InvalidRequest(
                f"send() takes a GenerateRequest, ChatRequest or EmbedRequest, got {type(request).__name__}"
            )
        open_request, combine = _RUNS[type(request)]

        async def open_job() -> Job[Any]:
            # Through `self`: a request holds its engine, whose finalizer would otherwise unload the model under it.
            return await open_request(self._service, request)

        return ChunkStream(open_job) if stream else ResponseStream(open_job, combine)

    @overload
    def generate(
        self,
        model: str,
        prompt: str | None = None,
        suffix: str | None = None,
        *,
        stream: Literal[False] = False,
        **fields: Unpack[GenerateFields],
    ) -> ResponseStream[GenerateResponse]: ...

    @overload
    def generate(
        self,
        model: str,
        prompt: str | None = None,
        suffix: str | None = None,
        *,
        stream: Literal[True],
        **fields: Unpack[GenerateFields],
    ) -> ChunkStream[GenerateResponse]: ...

    @overload
    def generate(
        self,
        model: str,
        prompt: str | None = None,
        suffix: str | None = None,
        *,
        stream: bool,
        **fields: Unpack[GenerateFields],
    ) -> ResponseStream[GenerateResponse] | ChunkStream[GenerateResponse]: ...

    @takes_fields_of(GenerateRequest)
    def generate(
        self,
        model: str,
        prompt: str | None = None,
        suffix: str | None = None,
        *,
        stream: bool = False,
        **fields: Unpack[GenerateFields],
    ) -> ResponseStream[GenerateResponse] | ChunkStream[GenerateResponse]:
        """Complete a prompt: `send` a `GenerateRequest` of these fields. Iterate for chunks, or await for
        the whole response.

        With ``stream=True``, awaiting gives an async iterator of chunks, as ``AsyncClient.generate`` does.
        With ``logprobs=True`` each chunk carries the logprobs of its tokens, each with the
        ``top_logprobs`` (0-20) most likely tokens at its position, and the final response has them all;
        as in Ollama, ``top_logprobs`` without ``logprobs`` adds nothing.

        As in Ollama, ``truncate`` (on by default) fits a prompt too long for the context: the model's
        MESSAGE history loses its oldest messages, then the runner cuts the prompt keeping ``num_keep``
        tokens; off, such a prompt raises `ContextLengthExceeded`. ``shift`` (on by default) lets
        generation that reaches the end of the context drop old tokens and go on.
        """
        return self.send(GenerateRequest(model, prompt, suffix=suffix, **fields), stream=stream)

    @overload
    def chat(
        self,
        model: str,
        messages: Iterable[MessageLike] | None = None,
        *,
        stream: Literal[False] = False,
        **fields: Unpack[ChatFields],
    ) -> ResponseStream[ChatResponse]: ...

    @overload
    def chat(
        self,
        model: str,
        messages: Iterable[MessageLike] | None = None,
        *,
        stream: Literal[True],
        **fields: Unpack[ChatFields],
    ) -> ChunkStream[ChatResponse]: ...

    @overload
    def chat(
        self, model: str, messages: Iterable[MessageLike] | None = None, *, stream: bool, **fields: Unpack[ChatFields]
    ) -> ResponseStream[ChatResponse] | ChunkStream[ChatResponse]: ...

    @takes_fields_of(ChatRequest)
    def chat(
        self,
        model: str,
        messages: Iterable[MessageLike] | None = None,
        *,
        stream: bool = False,
        **fields: Unpack[ChatFields],
    ) -> ResponseStream[ChatResponse] | ChunkStream[ChatResponse]:
        """Continue a conversation: `send` a `ChatRequest` of these fields. Iterate for chunks, or await
        for the whole response.

        With ``stream=True``, awaiting gives an async iterator of chunks, as ``AsyncClient.chat`` does.
        Messages and tools may be dicts or the ollama client's `Message` and `Tool` objects.
        ``logprobs`` and ``top_logprobs`` are as for `generate`.

        As in Ollama, ``truncate`` (on by default) drops the oldest messages of a conversation too long
        for the context, keeping the system messages and the latest message; off, such a conversation
        raises `ContextLengthExceeded`. ``shift`` is as for `generate`.
        """
        return self.send(ChatRequest(model, messages, **fields), stream=stream)

    async def render(self, request: GenerateRequest | ChatRequest) -> str:
        """The prompt `request` would run: what the model's template makes of it, with the model's SYSTEM
        and MESSAGE history (Ollama's ``_debug_render_only``). Nothing is loaded, so the conversation is
        not cut to the context as a request too long for it would be."""
        return await pipeline.render(self._service, request)

    async def embed(
        self,
        model: str,
        input: str | Sequence[str],
        truncate: bool | None = True,
        options: OptionValues | ModelDumpable | None = None,
        keep_alive: float | str | None = None,
        dimensions: int | None = None,
    ) -> EmbedResponse:
        """Embed one text or several (packed into one batch): `send` an `EmbedRequest`. Vectors are L2-normalised."""
        request = EmbedRequest(
            model, input, truncate=truncate is not False, options=options, keep_alive=keep_alive, dimensions=dimensions
        )
        return await self.send(request)

    async def embeddings(
        self,
        model: str,
        prompt: str,
        options: OptionValues | ModelDumpable | None = None,
        keep_alive: float | str | None = None,
    ) -> EmbeddingsResponse:
        """The legacy single-prompt embedding call (field `embedding`, not normalised)."""
        return await embed_prompt(self._service, model, prompt, options=plain_data(options), keep_alive=keep_alive)

    async def load(
        self, model: str, *, options: OptionValues | None = None, keep_alive: float | str | None = None
    ) -> None:
        """Load a model now (as a generate with an empty prompt does)."""
        await self.generate(model, "", options=options, keep_alive=keep_alive)

    async def ps(self) -> ProcessResponse:
        """The loaded models: name, size, size_vram, digest, details, expires_at, context_length, plan."""
        running = []
        for entry in await self._service.running():
            record, plan = entry.record, entry.record.loaded.plan
            running.append(
                ProcessModel(
                    name=record.name,
                    model=record.name,
                    size=record.size,
                    size_vram=record.size_vram,
                    digest=(entry.model.digest if entry.model else None) or "",
                    details=entry.model.details if entry.model else None,
                    expires_at=_wall_time(record.expires_wall),
                    context_length=record.loaded.context_length,
                    gpu_layers=plan.gpu_layers if plan is not None else 0,
                    layers_per_device=dict(plan.layers_per_device) if plan is not None else {},
                    active_requests=record.users,
                    prompt_cache_size=record.loaded.runner.prompt_cache_bytes,
                    pid=record.loaded.runner.pid,
                )
            )
        return ProcessResponse(models=running)

    async def unload(self, model: str) -> None:
        """Unload a model now (or as soon as its running requests finish)."""
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model must be a non-empty string: a model name or a path to a GGUF file")
        resolved = await anyio.to_thread.run_sync(self.registry.resolve, model)
        await self._service.unload(resolved)

    # -- the model registry ----------------------------------------------------------

    @overload
    async def create(
        self, model: str, *, stream: Literal[False] = False, **fields: Unpack[CreateFields]
    ) -> ProgressResponse: ...

    @overload
    async def create(
        self, model: str, *, stream: Literal[True], **fields: Unpack[CreateFields]
    ) -> ChunkStream[ProgressResponse]: ...

    @overload
    async def create(
        self, model: str, *, stream: bool, **fields: Unpack[CreateFields]
    ) -> ProgressResponse | ChunkStream[ProgressResponse]: ...

    async def create(
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
        renderer: str | None = None,
        parser: str | None = None,
        requires: str | None = None,
        quantize: str | None = None,
        modelfile: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None,
        stream: bool = False,
    ) -> ProgressResponse | ChunkStream[ProgressResponse]:
        """Create a model from a GGUF file, a Hugging Face folder, an existing model, uploaded blobs or a Modelfile.

        `files` and `adapters` map file names to the digests `create_blob` returned; `template`,
        `system`, `parameters`, `messages`, `license`, `renderer`, `parser` and `requires` are what
        a Modelfile's lines would say, and are added after those of `modelfile`, when both are given.
        `from_` names a file or a model to build on, when no `files` are given. Returns the final
        status, or with ``stream=True`` an async iterator of progress.
        """
        fields = (files, adapters, template, system, parameters, messages, license, renderer, parser, requires)
        parts = (
            CreateParts(
                files=files or {},
                adapters=adapters or {},
                template=template,
                system=system,
                parameters=plain_data(parameters) or {},
                messages=[Message.from_any(m).to_template_dict() for m in messages or ()],
                licenses=[license] if isinstance(license, str) else list(license or ()),
                renderer=renderer,
                parser=parser,
                requires=requires,
            )
            if any(value is not None for value in fields)
            else None
        )
        source, text = _str_or_path(from_), _str_or_path(modelfile)

        def work(emit: Emit, cancel: threading.Event) -> None:
            def report(event: dict[str, Any]) -> None:
                emit(ProgressResponse.from_event(event))

            self.registry.create(model, from_=source, modelfile=text, parts=parts, quantize=quantize, progress=report)

        return await self._with_progress(work, progress, stream)

    @overload
    async def pull(
        self,
        model: str,
        *,
        insecure: bool = False,
        progress: ProgressCallback | None = None,
        stream: Literal[False] = False,
    ) -> ProgressResponse: ...

    @overload
    async def pull(
        self, model: str, *, insecure: bool = False, progress: ProgressCallback | None = None, stream: Literal[True]
    ) -> ChunkStream[ProgressResponse]: ...

    @overload
    async def pull(
        self, model: str, *, insecure: bool = False, progress: ProgressCallback | None = None, stream: bool
    ) -> ProgressResponse | ChunkStream[ProgressResponse]: ...

    async def pull(
        self,
        model: str,
        *,
        insecure: bool = False,
        progress: ProgressCallback | None = None,
        stream: bool = False,
    ) -> ProgressResponse | ChunkStream[ProgressResponse]:
        """Download a model from Hugging Face (`hf.co/owner/repo:quant`) or an OCI registry.

        Returns the final status, or with ``stream=True`` an async iterator of progress. Cancelling
        (or leaving the loop) stops the download at its next chunk: only resumable state is left behind.
        """

        def work(emit: Emit, cancel: threading.Event) -> None:
            def report(event: dict[str, Any]) -> None:
                emit(ProgressResponse.from_event(event))

            self.registry.pull(model, progress=report, insecure=insecure, cancel=cancel)

        return await self._with_progress(work, progress, stream)

    async def push(self, model: str, *, insecure: bool = False, stream: bool = False) -> NoReturn:
        """Not supported: localllm does not upload models to a registry."""
        raise InvalidRequest(f"cannot push '{model}': localllm does not push models to a registry")

    @staticmethod
    async def _with_progress(
        work: Callable[[Emit, threading.Event], None], progress: ProgressCallback | None, stream: bool
    ) -> ProgressResponse | ChunkStream[ProgressResponse]:
        """Run `work` in a thread of its own; its progress goes to `progress` (in the event loop) and the stream."""

        async def report(chunk: ProgressResponse) -> None:
            if progress is not None:
                result = progress(as_dict(chunk))
                if inspect.isawaitable(result):
                    await result

        async def open_job() -> Job[ProgressResponse]:
            return ThreadJob(work, on_chunk=report)

        chunks = ChunkStream(open_job)
        if stream:
            return chunks
        async for _chunk in chunks:
            pass
        return ProgressResponse(status="success")

    async def list(self) -> ListResponse:
        """The models in the store, most recently modified first."""
        return ListResponse(models=await anyio.to_thread.run_sync(self.registry.list))

    async def show(self, model: str, *, verbose: bool = False) -> ShowResponse:
        """Details of a model: modelfile, parameters, template, details, modelinfo, capabilities, ..."""
        return await anyio.to_thread.run_sync(lambda: self.registry.show(model, verbose=verbose))

    async def copy(self, source: str, destination: str) -> StatusResponse:
        await anyio.to_thread.run_sync(self.registry.copy, source, destination)
        return StatusResponse(status="success")

    async def delete(self, model: str) -> StatusResponse:
        """Delete a model (unloading it first) and the blobs nothing else uses."""
        if self._service.started:
            try:
                await self.unload(model)
            except LocalLLMError:
                pass
        await anyio.to_thread.run_sync(self.registry.delete, model)
        return StatusResponse(status="success")

    # -- blobs

    async def create_blob(self, path: str | os.PathLike[str]) -> str:
        """Add a file to the store under its sha256 digest, as an upload does; the digest is for `create(files=...)`."""
        path = Path(path)
        digest = await anyio.to_thread.run_sync(sha256_of, path)
        if not await self.has_blob(digest):
            async with await anyio.open_file(path, "rb") as file:
                await self.add_blob(digest, _chunks_of(file))
        return digest

    def blob_path(self, digest: str) -> Path:
        """Where the store keeps the blob `digest` (which may not exist yet): for Modelfiles naming uploads."""
        return self.registry.store.blob_path(digest)

    async def has_blob(self, digest: str) -> bool:
        """Whether the store holds the blob `digest` (``sha256:<64 hex>``)."""
        return await anyio.to_thread.run_sync(self.registry.store.has_blob, digest)

    async def add_blob(self, digest: str, chunks: AsyncIterable[bytes], *, max_size: int | None = None) -> None:
        """Store the bytes `chunks` yield as the blob `digest`, once they hash to it.

        They are written under a temporary name and renamed into place only
        then. Raises DigestMismatch when they hash to another digest and
        BlobTooLarge past `max_size` bytes; nothing is left behind either way.
        """
        store = self.registry.store
        blob = await anyio.to_thread.run_sync(lambda: store.blob_writer(expected=digest, max_size=max_size))
        try:
            batch: list[bytes] = []
            batched = 0
            async for chunk in chunks:
                batch.append(chunk)
                batched += len(chunk)
                if batched >= 4 << 20:  # one thread hop per few MiB, not per network read
                    await anyio.to_thread.run_sync(blob.write, b"".join(batch))
                    batch, batched = [], 0
            await anyio.to_thread.run_sync(blob.write, b"".join(batch))
            await anyio.to_thread.run_sync(blob.commit)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(blob.discard)
