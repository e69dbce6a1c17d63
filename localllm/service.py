"""The model service: what every request does before it runs.

A request names a model; the service resolves the name in the registry, checks the model can do what
is asked (generate or embed), merges the options (defaults < model parameters < request), and leases
the model's runner, loaded with those load options, from the scheduler — or, for an empty request,
just loads or unloads it, as Ollama does. One runner per model file, as in Ollama: adapters, context
size, draft model and the other load options are the runner's, and a request asking for others
reloads the model once its running requests finish. The request pipelines (`pipeline.py`,
`embeddings.py`) talk only to this service, each inside an `admit()` that counts it under `max_queue`
for its whole life; the `Engine` owns one service and delegates to it.
"""

from __future__ import annotations

import functools
import logging
import warnings
import weakref
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar, cast

import anyio
import attrs

from .chat.harmony import select_harmony
from .chat.template import ChatTemplate, PlainTemplate, load_template
from .errors import CapabilityError, EngineClosed, InvalidRequest, ModelNotFound
from .media import MediaLimits
from .options import Options, OptionValues, merge_options
from .runner.protocol import EmbedRunner, LoadConfig, ModelRunner, TextRunner
from .scheduler.keepalive import parse_keep_alive
from .scheduler.loader import RunnerFactory
from .scheduler.scheduler import Admission, Lease, LoadedModel, Scheduler
from .settings import EngineSettings
from .stream import Job

if TYPE_CHECKING:
    from .registry.registry import Registry, ResolvedModel
    from .runner.backend import Backend
    from .scheduler.devices import InventorySource

__all__ = ["INLINE_WORK_CHARS", "Admitted", "ModelService", "Purpose", "model_identity", "off_loop_if_long"]

Purpose = Literal["generate", "embed"]

#: Text longer than this is tokenized in a worker thread, so the event loop never waits on it.
INLINE_WORK_CHARS = 16_384

T = TypeVar("T")

logger = logging.getLogger("localllm")

# Services that have started a scheduler and are not closed: a second one on the same store warns.
_running: weakref.WeakSet[ModelService] = weakref.WeakSet()


async def off_loop_if_long(size: int, work: Callable[[], T]) -> T:
    """Run `work` inline when its input is small, else in a worker thread."""
    if size > INLINE_WORK_CHARS:
        return await anyio.to_thread.run_sync(work)
    return work()


def model_identity(config: LoadConfig) -> Hashable:
    """Which model a load configuration runs: its file (Ollama keys its runners by the model path).

    A text model asked for embeddings runs in an embedding runner beside its text runner: the two serve
    different requests, so neither makes the other reload."""
    return config.model_path, config.embeddings


class Admitted(Job[T]):
    """A request's job that holds the request's place under `max_queue` until the job is closed."""

    def __init__(self, job: Job[T], admission: Admission) -> None:
        admission.keep()
        self._job = job
        self._admission = admission

    async def next_chunks(self) -> tuple[list[T], bool]:
        return await self._job.next_chunks()

    def close(self) -> None:
        try:
            self._job.close()
        finally:
            self._admission.release()


@attrs.frozen
class Running:
    """A loaded runner as `ps()` shows it: the scheduler's record and the model it was loaded for."""

    record: LoadedModel[LoadConfig, ModelRunner]
    model: ResolvedModel | None


class ModelService:
    """Resolve, check, merge options, and lease runners: the one path from a request to a runner."""

    def __init__(
        self, settings: EngineSettings, *, devices: InventorySource | None = None, backend: Backend | None = None
    ) -> None:
        self.settings = settings
        self.factory = RunnerFactory(settings, devices=devices, backend=backend)
        self._registry: Registry | None = None
        self._scheduler: Scheduler[LoadConfig, ModelRunner] | None = None
        self._models: dict[LoadConfig, ResolvedModel] = {}  # the model each runner was loaded for
        self.closed = False

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            from .registry.registry import Registry

            self._registry = Registry(self.settings.models, quantizer=_quantize)
        return self._registry

    @property
    def scheduler(self) -> Scheduler[LoadConfig, ModelRunner]:
        """The scheduler, created on first use (inside the event loop)."""
        if self.closed:
            raise EngineClosed("this engine is closed; open a new one")
        if self._scheduler is None:
            self._warn_if_store_shared()
            _running.add(self)
            self._scheduler = Scheduler(
                loader=self.factory.load,
                sizer=self.factory.size,
                memory_budget=self.factory.memory_budget,
                max_loaded=self.factory.max_loaded_models(),
                max_queue=self.settings.max_queue,
                identity=model_identity,
            )
        return self._scheduler

    @property
    def started(self) -> bool:
        """Whether a scheduler exists (anything may be loaded)."""
        return self._scheduler is not None

    async def close(self) -> None:
        self.closed = True
        if self._scheduler is not None:
            await self._scheduler.close()
        self.factory.close()

    def release(self) -> None:
        """Close every runner at once, from any thread: the engine was dropped (or the process exits) unclosed."""
        if self.closed:
            return
        self.closed = True
        if self._scheduler is not None:
            logger.info("an Engine on %s was not closed: unloading its models", self.settings.models)
            self._scheduler.release()
        self.factory.close()

    def _warn_if_store_shared(self) -> None:
        """Two engines on one store each load their own copy of a model: say so, once, when the second starts."""
        for other in list(_running):
            if other is not self and not other.closed and other.settings.models == self.settings.models:
                warnings.warn(
                    f"another Engine in this process already runs models from {self.settings.models}; each "
                    "Engine loads its own copy of a model, so share one Engine (or close the other with "
                    "`await engine.aclose()`)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return

    # -- the steps of a request ---------------------------------------------------

    def admit(self) -> Admission:
        """Accept a request (QueueFull when `max_queue` are in flight), as a context manager around its
        pipeline; hand the place to the request's job with `Admitted` when the job outlives the block."""
        return self.scheduler.admit()

    async def resolve(self, model: str, purpose: Purpose) -> ResolvedModel:
        """The model by that name (or GGUF path), checked to be able to do `purpose`."""
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model must be a non-empty string: a model name or a path to a GGUF file")
        return await anyio.to_thread.run_sync(self._resolve_and_check, model, purpose)

    def _resolve_and_check(self, model: str, purpose: Purpose) -> ResolvedModel:
        from .gguf.architectures import describe_kind

        resolved = self.registry.resolve(model)
        embedding, arch = describe_kind(str(resolved.model_path))
        if purpose == "generate" and embedding:
            raise CapabilityError(
                f"'{model}' is an embedding model ({arch}) and cannot generate text; use engine.embed() with it"
            )
        # A text generation model embeds too, as in Ollama: its hidden states, mean-pooled.
        return resolved

    @property
    def media_limits(self) -> MediaLimits:
        return self.settings.media_limits

    def check_images(self, model: str, resolved: ResolvedModel) -> None:
        """Refuse images for a model without a projector: dropped silently, they would have the model invent
        what it saw."""
        if resolved.projector is None:
            raise CapabilityError(f"'{model}' does not support images: it is not a vision model")

    def options(self, resolved: ResolvedModel, request: OptionValues | None) -> Options:
        # The engine's default num_ctx (context_length, else by GPU memory) under the model's and the request's.
        return merge_options({"num_ctx": self.factory.default_num_ctx()}, resolved.params, request)

    def keep_alive(self, value: float | str | None) -> float:
        return parse_keep_alive(value, self.settings.keep_alive)

    def config(self, resolved: ResolvedModel, options: Options, purpose: Purpose) -> LoadConfig:
        """The load configuration. Resolves a draft model's name, which reads the store: call it in a
        worker thread when `options.draft_model` is set."""
        adapters = tuple(str(path) for path in resolved.adapters)
        generate = purpose == "generate"
        draft = self._draft_model_path(options.draft_model) if generate else None
        projector = str(resolved.projector) if generate and resolved.projector is not None else None
        return self.factory.config_for(
            str(resolved.model_path),
            adapters,
            options,
            embeddings=not generate,
            draft_model_path=draft,
            projector_path=projector,
        )

    def _draft_model_path(self, name: str) -> str | None:
        """The draft model's file, its name resolved as any model's for generation; None when none is named."""
        if not name:
            return None
        try:
            return str(self._resolve_and_check(name, "generate").model_path)
        except ModelNotFound as exc:
            raise ModelNotFound(f"draft_model: {exc}", model=exc.model) from None

    async def lease_text(
        self, resolved: ResolvedModel, options: Options, keep_alive: float | str | None
    ) -> Lease[LoadConfig, TextRunner]:
        lease = await self._lease(resolved, options, keep_alive, "generate")
        return cast("Lease[LoadConfig, TextRunner]", lease)  # a generation config always loads a text runner

    async def lease_embed(
        self, resolved: ResolvedModel, options: Options, keep_alive: float | str | None
    ) -> Lease[LoadConfig, EmbedRunner]:
        lease = await self._lease(resolved, options, keep_alive, "embed")
        return cast("Lease[LoadConfig, EmbedRunner]", lease)  # an embedding config always loads an embedding runner

    async def _lease(
        self, resolved: ResolvedModel, options: Options, keep_alive: float | str | None, purpose: Purpose
    ) -> Lease[LoadConfig, ModelRunner]:
        if options.draft_model:
            key = await anyio.to_thread.run_sync(self.config, resolved, options, purpose)
        else:
            key = self.config(resolved, options, purpose)
        lease = await self.scheduler.acquire(key, name=resolved.name, keep_alive=self.keep_alive(keep_alive))
        self._models.setdefault(key, resolved)
        return lease

    async def unload(self, resolved: ResolvedModel) -> None:
        """Unload the model's runner (once its requests finish)."""
        path = str(resolved.model_path)
        await self.scheduler.unload_where(lambda m: m.key.model_path == path)

    async def load_or_unload(
        self, resolved: ResolvedModel, options: Options, keep_alive: float | str | None, purpose: Purpose
    ) -> tuple[Literal["load", "unload"], int]:
        """An empty request: with keep_alive 0 it unloads the model, else it loads it. (reason, load ns)"""
        if self.keep_alive(keep_alive) == 0:
            await self.unload(resolved)
            return "unload", 0
        lease = await self._lease(resolved, options, keep_alive, purpose)
        lease.release()
        return "load", lease.load_duration

    async def template(self, resolved: ResolvedModel) -> ChatTemplate:
        """The model's chat template: its own (Modelfile TEMPLATE), else the one its GGUF carries, with the
        BOS and EOS tokens' text from the GGUF's vocabulary. Read from the file, so no runner is needed."""
        template = await anyio.to_thread.run_sync(self._template, str(resolved.model_path), resolved.template)
        return select_harmony(template, renderer=resolved.renderer, parser=resolved.parser)

    def _template(self, model_path: str, own: str | None) -> ChatTemplate:
        info = self.factory.info(model_path)  # read once per version of the file
        source = own or info.chat_template
        if not source:
            return PlainTemplate()
        return _compiled_template(source, info.bos_token or "", info.eos_token or "")

    async def running(self) -> list[Running]:
        records = await self.scheduler.running()
        live = {m.key for m in records}
        for key in [k for k in self._models if k not in live]:
            del self._models[key]
        return [Running(m, self._models.get(m.key)) for m in records]


def _quantize(src: Path, dst: Path, *, ftype_name: str, progress: Callable[[dict[str, object]], None]) -> Path:
    """Quantizing runs llama.cpp, which only the runner calls: imported when first needed."""
    from .runner.quantize import quantize_gguf

    return quantize_gguf(src, dst, ftype_name=ftype_name, progress=progress)


@functools.lru_cache(maxsize=64)
def _compiled_template(source: str, bos: str, eos: str) -> ChatTemplate:
    """Templates are compiled once per (source, special tokens): a model's, never a runner's."""
    return load_template(source, bos_token=bos, eos_token=eos)
