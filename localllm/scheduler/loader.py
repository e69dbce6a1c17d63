"""Turning a resolved model and its options into a runner: load configuration, memory plan, loading."""

from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING

import attrs

from ..errors import InvalidRequest
from ..options import Options, runner_load_values
from ..runner.protocol import LoadConfig, ModelRunner
from ..settings import default_context_length
from .devices import DeviceInventory, InventorySource, resolve_inventory
from .memory import LayerPlan, MemoryEstimate, estimate_memory, format_bytes, plan_layers, projector_memory
from .scheduler import Loaded

if TYPE_CHECKING:
    from ..gguf.inspect import GGUFInfo
    from ..runner.backend import Backend
    from ..runner.prompt_cache import PromptCache
    from ..settings import EngineSettings

__all__ = ["RunnerFactory"]

logger = logging.getLogger("localllm.scheduler")


@functools.lru_cache(maxsize=32)
def _read_info(path: str, _mtime: float) -> GGUFInfo:
    from ..gguf import read_info

    return read_info(path)


def _info(path: str) -> GGUFInfo:
    return _read_info(path, os.stat(path).st_mtime)


class RunnerFactory:
    """Builds a `LoadConfig` from options, plans its memory, and loads it: in a worker thread, or a text
    model in a child process of its own with `isolation="process"` (embedding models stay in threads).

    `backend` replaces llama.cpp under the runners (tests, alternative kernels); an object in this
    process cannot serve a runner in a child, so it needs `isolation="thread"`."""

    def __init__(
        self, settings: EngineSettings, *, devices: InventorySource | None = None, backend: Backend | None = None
    ) -> None:
        if backend is not None and settings.isolation == "process":
            raise InvalidRequest(
                'a backend runs in this process, so it cannot serve runners in child processes: use isolation="thread"'
                " with a backend, or leave the backend out"
            )
        self.settings = settings
        self._devices = devices
        self._backend = backend
        self._prompt_cache: PromptCache | None = None
        self._default_num_ctx: int | None = None

    @property
    def prompt_cache(self) -> PromptCache:
        """The saved prompt states every text runner shares, made on first use (it may scan its directory)."""
        if self._prompt_cache is None:
            from ..runner.prompt_cache import PromptCache

            settings = self.settings
            self._prompt_cache = PromptCache(
                settings.prompt_cache_bytes, directory=settings.prompt_cache_dir, key_file=settings.prompt_cache_key
            )
        return self._prompt_cache

    def close(self) -> None:
        """Close the prompt cache; call after every runner is closed (closing runners save into it)."""
        if self._prompt_cache is not None:
            self._prompt_cache.close()

    def info(self, model_path: str) -> GGUFInfo:
        """What the model file says of itself (read once per version of the file)."""
        return _info(model_path)

    def inventory(self) -> DeviceInventory:
        return resolve_inventory(self._devices)

    def default_num_ctx(self) -> int:
        """num_ctx where neither the model nor the request sets it: the context_length setting, else Ollama's
        choice by the GPUs' total memory (4096 without a GPU), looked at once."""
        if self.settings.context_length:
            return self.settings.context_length
        if self._default_num_ctx is None:
            totals = [gpu.total_memory for gpu in self.inventory().gpus]
            self._default_num_ctx = default_context_length(totals, self.settings.gpu_overhead)
        return self._default_num_ctx

    def max_loaded_models(self) -> int:
        """The max_loaded_models setting, else (0) 3 per GPU and 3 without one, as Ollama."""
        if self.settings.max_loaded_models:
            return self.settings.max_loaded_models
        return 3 * max(len(self.inventory().gpus), 1)

    def config_for(
        self,
        model_path: str,
        adapters: tuple[str, ...],
        options: Options,
        *,
        embeddings: bool = False,
        draft_model_path: str | None = None,
        projector_path: str | None = None,
    ) -> LoadConfig:
        """The load configuration; `draft_model_path` is the file `options.draft_model` names, if any.

        Embedding runners never draft. A draft model takes the place of prompt lookup. The memory
        estimate leaves the draft model out (it is meant to be a small fraction of the model). num_ctx
        beyond the context the model was trained for is cut to it, as Ollama does.
        """
        trained = _info(model_path).context_length or 0
        # The request's load options as this model and runner take them; LoadConfig takes every one from here.
        fitted = attrs.evolve(
            options,
            num_ctx=min(options.num_ctx, trained) if trained > 0 else options.num_ctx,
            prompt_lookup=options.prompt_lookup and not embeddings and not draft_model_path,
        )
        return LoadConfig(
            model_path=model_path,
            adapters=adapters,
            embeddings=embeddings,
            draft_model_path=None if embeddings else draft_model_path or None,
            projector_path=None if embeddings else projector_path,
            num_parallel=1 if embeddings else self.settings.num_parallel,
            kv_cache_type=self.settings.kv_cache_type,
            flash_attention=self.settings.flash_attention,
            repack=self.settings.repack,
            **runner_load_values(fitted),
        )

    def estimate(self, config: LoadConfig) -> MemoryEstimate:
        """What the config's model needs, its projector (for images and audio) counted with its weights."""
        estimate = estimate_memory(
            _info(config.model_path),
            num_ctx=config.num_ctx,
            num_parallel=config.num_parallel,
            kv_cache_type=config.kv_cache_type,
            num_batch=config.num_batch,
            # Where llama.cpp decides, plan for the larger graph of attention without it.
            flash_attention=bool(config.flash_attention) or config.kv_cache_type != "f16",
        )
        if config.projector_path:
            projector = _info(config.projector_path)
            size = os.path.getsize(config.projector_path)
            estimate = attrs.evolve(estimate, projector_bytes=projector_memory(projector, size))
        return estimate

    def plan(self, config: LoadConfig, inventory: DeviceInventory | None = None) -> LayerPlan:
        return plan_layers(
            self.estimate(config),
            inventory if inventory is not None else self.inventory(),
            num_gpu=config.num_gpu,
            main_gpu=config.main_gpu,
            overhead=self.settings.gpu_overhead,
            spread=self.settings.sched_spread,
        )

    def size(self, config: LoadConfig) -> tuple[int, int]:
        """(total, VRAM) bytes the config needs, planned as if the machine were empty.

        Raises InsufficientMemory when it could never fit.
        """
        plan = self.plan(config, self.inventory().with_all_free())
        return plan.total_bytes, plan.vram_bytes

    def memory_budget(self) -> int:
        """Memory free right now, host and GPUs together."""
        inventory = self.inventory()
        return inventory.system.free + sum(gpu.free_memory for gpu in inventory.gpus)

    def load(self, config: LoadConfig) -> Loaded[ModelRunner]:
        plan = self.plan(config)
        logger.info(
            "loading %s: %d layers on GPU %s, %s in VRAM, %s in all",
            config.model_path,
            plan.gpu_layers,
            plan.layers_per_device or "-",
            format_bytes(plan.vram_bytes),
            format_bytes(plan.total_bytes),
        )
        runner: ModelRunner
        if config.embeddings:
            from ..runner.embed import EmbeddingRunner

            runner = EmbeddingRunner(
                config, gpu_layers=plan.gpu_layers, tensor_split=plan.tensor_split, backend=self._backend
            )
        elif self.settings.isolation == "process":
            from ..runner.process import ProcessRunner

            # The child keeps a prompt cache of its own, sized and placed as this one would be.
            runner = ProcessRunner(
                config,
                gpu_layers=plan.gpu_layers,
                tensor_split=plan.tensor_split,
                prompt_cache_bytes=self.settings.prompt_cache_bytes,
                prompt_cache_dir=self.settings.prompt_cache_dir,
                prompt_cache_key=self.settings.prompt_cache_key,
                timeout=self.settings.runner_timeout,
            )
        else:
            from ..runner.worker import Runner

            runner = Runner(
                config,
                gpu_layers=plan.gpu_layers,
                tensor_split=plan.tensor_split,
                backend=self._backend,
                prompt_cache=self.prompt_cache,
            )
        return Loaded(runner, plan.total_bytes, plan.vram_bytes, context_length=runner.n_ctx_seq, plan=plan)
