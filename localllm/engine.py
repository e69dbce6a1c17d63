"""The Engine: the public facade. It wires the registry, the scheduler and the runners together."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.from_thread
import attrs

from . import requests
from .errors import EngineClosed, InvalidRequest, LocalLLMError
from .options import Options, merge_options
from .scheduler.keepalive import parse_keep_alive
from .scheduler.scheduler import Lease, Scheduler
from .stream import ResponseStream
from .types import ChatResponse, GenerateResponse, Message, ProcessModel

__all__ = ["Engine"]

logger = logging.getLogger("localllm")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise LocalLLMError(f"environment variable {name} must be an integer, got {value!r}") from None


def _env_bool(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if not value or value == "auto":
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise LocalLLMError(f"environment variable {name} must be 1/0, true/false, on/off or auto, got {value!r}")


@attrs.frozen
class EngineSettings:
    home: Path
    models: Path
    num_parallel: int
    max_loaded_models: int
    max_queue: int
    keep_alive: float
    kv_cache_type: str
    flash_attention: bool
    repack: bool | None  # None: llama.cpp's weight repacking where this CPU and build run it safely

    @classmethod
    def resolve(
        cls,
        home: str | os.PathLike[str] | None,
        models: str | os.PathLike[str] | None,
        num_parallel: int | None,
        max_loaded_models: int | None,
        max_queue: int | None,
        keep_alive: float | str | None,
        kv_cache_type: str | None,
        flash_attention: bool | None = None,
        repack: bool | None = None,
    ) -> EngineSettings:
        home_path = Path(home or os.environ.get("LOCALLLM_HOME") or Path.home() / ".localllm").expanduser()
        models_path = Path(models or os.environ.get("LOCALLLM_MODELS") or home_path / "models").expanduser()
        parallel = num_parallel if num_parallel is not None else _env_int("LOCALLLM_NUM_PARALLEL", 4)
        loaded = max_loaded_models if max_loaded_models is not None else _env_int("LOCALLLM_MAX_LOADED_MODELS", 3)
        queue = max_queue if max_queue is not None else _env_int("LOCALLLM_MAX_QUEUE", 512)
        for name, value in (("num_parallel", parallel), ("max_loaded_models", loaded), ("max_queue", queue)):
            if value < 1:
                raise InvalidRequest(f"{name} must be at least 1, got {value}")
        alive = parse_keep_alive(keep_alive if keep_alive is not None else os.environ.get("LOCALLLM_KEEP_ALIVE"), 300.0)
        kv_type = (kv_cache_type or os.environ.get("LOCALLLM_KV_CACHE_TYPE") or "f16").lower()
        if kv_type not in ("f16", "q8_0", "q4_0"):
            raise InvalidRequest(f"kv_cache_type must be f16, q8_0 or q4_0, got {kv_type!r}")
        if flash_attention is None:
            flash_attention = _env_bool("LOCALLLM_FLASH_ATTENTION") or False
        if repack is None:
            repack = _env_bool("LOCALLLM_REPACK")
        return cls(home_path, models_path, parallel, loaded, queue, alive, kv_type, flash_attention, repack)


def _describe(resolved: Any) -> dict[str, Any]:
    return {"digest": getattr(resolved, "digest", None), "details": getattr(resolved, "details", None)}


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
        self.settings = EngineSettings.resolve(
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
        from .scheduler.loader import RunnerFactory

        self._factory = RunnerFactory(self.settings, devices=devices)
        self._scheduler: Scheduler | None = None
        self._closed = False
        self._registry: Any = None

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Unload every model and join every worker thread. The engine cannot be used afterwards."""
        self._closed = True
        if self._scheduler is not None:
            await self._scheduler.close()

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler, created on first use (inside the event loop)."""
        if self._closed:
            raise EngineClosed("this engine is closed; open a new one")
        if self._scheduler is None:
            self._scheduler = Scheduler(
                loader=self._factory.load,
                sizer=self._factory.size,
                memory_budget=self._factory.memory_budget,
                max_loaded=self.settings.max_loaded_models,
                max_queue=self.settings.max_queue,
            )
        return self._scheduler

    @property
    def registry(self) -> Any:
        if self._registry is None:
            from .registry.registry import Registry

            self._registry = Registry(self.settings.models)
        return self._registry

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
        options: Mapping[str, Any] | None = None,
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
            options=dict(options) if options else None,
            keep_alive=keep_alive,
            think=think,
        )
        return ResponseStream(lambda: requests.open_generate(self, request), requests.combine_generate)

    def chat(
        self,
        model: str,
        messages: Iterable[Message | Mapping[str, Any]] = (),
        *,
        tools: Sequence[Any] | None = None,
        format: str | Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
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
            options=dict(options) if options else None,
            keep_alive=keep_alive,
            think=think,
            tool_choice=tool_choice,
        )
        return ResponseStream(lambda: requests.open_chat(self, request), requests.combine_chat)

    async def embed(
        self,
        model: str,
        input: str | Sequence[str],
        *,
        truncate: bool = True,
        dimensions: int | None = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
    ) -> Any:
        """Embed one text or several (packed into one batch); vectors are L2-normalised."""
        from . import embeddings

        return await embeddings.embed(
            self, model, input, truncate=truncate, dimensions=dimensions, options=options, keep_alive=keep_alive
        )

    async def embeddings(
        self,
        model: str,
        prompt: str,
        *,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
    ) -> Any:
        """The legacy single-prompt embedding call (field `embedding`, not normalised)."""
        from . import embeddings

        return await embeddings.embeddings(self, model, prompt, options=options, keep_alive=keep_alive)

    # -- internals used by requests.py ------------------------------------------------

    async def _resolve(self, model: str) -> Any:
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model must be a non-empty string: a model name or a path to a GGUF file")
        return await anyio.to_thread.run_sync(self.registry.resolve, model)

    async def _acquire(
        self, resolved: Any, options: Options, keep_alive: float | str | None, *, embeddings: bool = False
    ) -> Lease:
        alive = parse_keep_alive(keep_alive, self.settings.keep_alive)
        key = self._factory.config_for(resolved, options, embeddings=embeddings)
        return await self.scheduler.acquire(key, name=resolved.name, keep_alive=alive, describe=_describe(resolved))

    async def _unload_file(self, model_path: Any) -> None:
        """Unload every runner of one model file (once its requests finish)."""
        path = str(model_path)
        await self.scheduler.unload_where(lambda m: m.key.model_path == path)

    def _options(self, resolved: Any, options: Mapping[str, Any] | None) -> Options:
        return merge_options(resolved.params, options)

    async def load(self, model: str, *, options: Mapping[str, Any] | None = None,
                   keep_alive: float | str | None = None) -> None:
        """Load a model now (as a generate with an empty prompt does)."""
        await self.generate(model, "", options=options, keep_alive=keep_alive)

    async def ps(self) -> list[ProcessModel]:
        """The loaded models: name, size, size_vram, digest, details, expires_at, context_length, plan."""
        running = []
        for loaded in await self.scheduler.running():
            plan = loaded.info.get("plan")
            running.append(
                ProcessModel(
                    name=loaded.name,
                    model=loaded.name,
                    size=loaded.size,
                    size_vram=loaded.size_vram,
                    digest=loaded.info.get("digest") or "",
                    details=loaded.info.get("details"),
                    expires_at=_iso_or_none(loaded.expires_wall),
                    context_length=loaded.info.get("context_length", loaded.key.num_ctx),
                    gpu_layers=plan.gpu_layers if plan is not None else 0,
                    layers_per_device=dict(plan.layers_per_device) if plan is not None else {},
                    active_requests=loaded.users,
                )
            )
        return running

    async def unload(self, model: str) -> None:
        """Unload a model now (or as soon as its running requests finish)."""
        resolved = await self._resolve(model)
        await self._unload_file(resolved.model_path)

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

    async def list(self) -> Any:
        """The models in the store, newest first."""
        return await anyio.to_thread.run_sync(self.registry.list)

    async def show(self, model: str, *, verbose: bool = False) -> Any:
        """Details of a model: modelfile, parameters, template, details, model_info, capabilities."""
        return await anyio.to_thread.run_sync(lambda: self.registry.show(model, verbose=verbose))

    async def copy(self, source: str, destination: str) -> None:
        await anyio.to_thread.run_sync(self.registry.copy, source, destination)

    async def delete(self, model: str) -> None:
        """Delete a model (unloading it first) and the blobs nothing else uses."""
        if self._scheduler is not None:
            try:
                await self.unload(model)
            except LocalLLMError:
                pass
        await anyio.to_thread.run_sync(self.registry.delete, model)
