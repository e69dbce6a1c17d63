"""The Engine: the public facade. It wires the registry, the scheduler and the runners together."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread

from . import requests
from .errors import InvalidRequest, LocalLLMError
from .options import OptionValues, check_options
from .service import ModelService
from .settings import EngineSettings
from .stream import ResponseStream
from .types import ChatResponse, GenerateResponse, Message, ProcessModel

if TYPE_CHECKING:
    from .embeddings import EmbeddingsResponse, EmbedResponse
    from .registry.registry import ModelEntry, Registry, ShowResponse
    from .runner.protocol import LoadConfig, ModelRunner
    from .scheduler.scheduler import Scheduler

__all__ = ["Engine"]

logger = logging.getLogger("localllm")


def _iso_or_none(timestamp: float | None) -> str | None:
    import datetime as dt
    import math

    if timestamp is None:
        return None
    if math.isinf(timestamp):
        return "0001-01-01T00:00:00Z" if timestamp < 0 else "2318-01-01T00:00:00Z"  # "forever", as Ollama shows it
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat().replace("+00:00", "Z")


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
        devices: Any = None,
    ) -> None:
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
        )
        self._service = ModelService(settings, devices=devices)

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Unload every model and join every worker thread. The engine cannot be used afterwards."""
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

    def generate(
        self,
        model: str,
        prompt: str = "",
        *,
        suffix: str | None = None,
        system: str | None = None,
        template: str | None = None,
        context: Sequence[int] | None = None,
        raw: bool = False,
        format: str | Mapping[str, Any] | None = None,
        images: Sequence[Any] | None = None,
        options: OptionValues | None = None,
        keep_alive: float | str | None = None,
        think: bool | str | None = None,
    ) -> ResponseStream[GenerateResponse]:
        """Complete a prompt. Iterate for chunks, or await for the whole response."""
        if not isinstance(prompt, str):
            raise InvalidRequest(f"prompt must be a string, got {type(prompt).__name__}")
        request = requests.GenerateRequest(
            model=model,
            prompt=prompt,
            suffix=suffix,
            system=system,
            template=template,
            context=tuple(context) if context else None,
            raw=raw,
            format=format,
            images=tuple(images) if images else None,
            options=check_options(options) or None,
            keep_alive=keep_alive,
            think=think,
        )
        return ResponseStream(lambda: requests.open_generate(self._service, request), requests.combine_generate)

    def chat(
        self,
        model: str,
        messages: Iterable[Message | Mapping[str, Any]] = (),
        *,
        tools: Sequence[Any] | None = None,
        format: str | Mapping[str, Any] | None = None,
        options: OptionValues | None = None,
        keep_alive: float | str | None = None,
        think: bool | str | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
    ) -> ResponseStream[ChatResponse]:
        """Continue a conversation. Iterate for chunks, or await for the whole response."""
        request = requests.ChatRequest(
            model=model,
            messages=tuple(Message.from_any(m) for m in messages),
            tools=tuple(tools) if tools else None,
            format=format,
            options=check_options(options) or None,
            keep_alive=keep_alive,
            think=think,
            tool_choice=tool_choice,
        )
        return ResponseStream(lambda: requests.open_chat(self._service, request), requests.combine_chat)

    async def embed(
        self,
        model: str,
        input: str | Sequence[str],
        *,
        truncate: bool = True,
        dimensions: int | None = None,
        options: OptionValues | None = None,
        keep_alive: float | str | None = None,
    ) -> EmbedResponse:
        """Embed one text or several (packed into one batch); vectors are L2-normalised."""
        from . import embeddings

        return await embeddings.embed(
            self._service,
            model,
            input,
            truncate=truncate,
            dimensions=dimensions,
            options=options,
            keep_alive=keep_alive,
        )

    async def embeddings(
        self,
        model: str,
        prompt: str,
        *,
        options: OptionValues | None = None,
        keep_alive: float | str | None = None,
    ) -> EmbeddingsResponse:
        """The legacy single-prompt embedding call (field `embedding`, not normalised)."""
        from . import embeddings

        return await embeddings.embeddings(self._service, model, prompt, options=options, keep_alive=keep_alive)

    async def load(
        self, model: str, *, options: OptionValues | None = None, keep_alive: float | str | None = None
    ) -> None:
        """Load a model now (as a generate with an empty prompt does)."""
        await self.generate(model, "", options=options, keep_alive=keep_alive)

    async def ps(self) -> list[ProcessModel]:
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
                    expires_at=_iso_or_none(record.expires_wall),
                    context_length=record.loaded.context_length,
                    gpu_layers=plan.gpu_layers if plan is not None else 0,
                    layers_per_device=dict(plan.layers_per_device) if plan is not None else {},
                    active_requests=record.users,
                )
            )
        return running

    async def unload(self, model: str) -> None:
        """Unload a model now (or as soon as its running requests finish)."""
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model must be a non-empty string: a model name or a path to a GGUF file")
        resolved = await anyio.to_thread.run_sync(self.registry.resolve, model)
        await self._service.unload(resolved)

    @staticmethod
    def _on_progress(progress: Callable[[dict[str, Any]], Any] | None) -> Callable[[dict[str, Any]], None]:
        """Progress events come from a worker thread; deliver them to the callback in the event loop."""
        if progress is None:
            return lambda _event: None
        if inspect.iscoroutinefunction(progress):
            return lambda event: anyio.from_thread.run(progress, event)
        return lambda event: anyio.from_thread.run_sync(progress, event)

    # -- the model registry ----------------------------------------------------------

    async def create(
        self,
        model: str,
        *,
        from_: str | os.PathLike[str] | None = None,
        modelfile: str | os.PathLike[str] | None = None,
        quantize: str | None = None,
        progress: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        """Create a model from a GGUF file, an existing model, or a Modelfile."""
        kwargs: dict[str, Any] = {"from_": from_, "modelfile": modelfile, "progress": self._on_progress(progress)}
        if quantize is not None:
            kwargs["quantize"] = quantize
        await anyio.to_thread.run_sync(lambda: self.registry.create(model, **kwargs))

    async def pull(
        self, model: str, *, progress: Callable[[dict[str, Any]], Any] | None = None, insecure: bool = False
    ) -> None:
        """Download a model from Hugging Face (`hf.co/owner/repo:quant`) or an OCI registry."""
        import threading

        cancel, finished = threading.Event(), threading.Event()

        def run() -> None:
            try:
                self.registry.pull(model, progress=self._on_progress(progress), insecure=insecure, cancel=cancel)
            finally:
                finished.set()

        try:
            await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            # Stop the download at its next chunk and wait for it: only resumable state is left behind.
            cancel.set()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(finished.wait)
            raise

    async def list(self) -> list[ModelEntry]:
        """The models in the store, newest first."""
        return await anyio.to_thread.run_sync(self.registry.list)

    async def show(self, model: str, *, verbose: bool = False) -> ShowResponse:
        """Details of a model: modelfile, parameters, template, details, model_info, capabilities."""
        return await anyio.to_thread.run_sync(lambda: self.registry.show(model, verbose=verbose))

    async def copy(self, source: str, destination: str) -> None:
        await anyio.to_thread.run_sync(self.registry.copy, source, destination)

    async def delete(self, model: str) -> None:
        """Delete a model (unloading it first) and the blobs nothing else uses."""
        if self._service.started:
            try:
                await self.unload(model)
            except LocalLLMError:
                pass
        await anyio.to_thread.run_sync(self.registry.delete, model)

    # -- blobs

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
