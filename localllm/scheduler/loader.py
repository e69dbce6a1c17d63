"""Turning a resolved model and its options into a runner: load configuration, sizing, loading."""

from __future__ import annotations

import logging
from typing import Any

from ..options import Options
from ..runner.protocol import LoadConfig

__all__ = ["RunnerFactory"]

logger = logging.getLogger("localllm.scheduler")


class RunnerFactory:
    """Knows how to build a `LoadConfig` from options, how big it will be, and how to load it."""

    def __init__(self, settings: Any, *, devices: Any = None) -> None:
        self.settings = settings
        self._devices = devices

    def config_for(self, resolved: Any, options: Options, *, embeddings: bool = False) -> LoadConfig:
        return LoadConfig(
            model_path=str(resolved.model_path),
            num_ctx=options.num_ctx,
            num_batch=options.num_batch,
            num_parallel=self.settings.num_parallel,
            num_thread=options.num_thread,
            n_gpu_layers=0 if options.num_gpu < 0 else options.num_gpu,
            main_gpu=options.main_gpu,
            use_mmap=options.use_mmap,
            use_mlock=options.use_mlock,
            embeddings=embeddings,
            kv_cache_type=self.settings.kv_cache_type,
            adapters=tuple(str(p) for p in getattr(resolved, "adapters", ())),
        )

    def estimate(self, config: LoadConfig) -> tuple[int, int]:
        return 0, 0

    def memory_budget(self) -> int:
        return 1 << 62

    def load(self, config: LoadConfig) -> tuple[Any, int, int, dict[str, Any]]:
        from ..runner.worker import Runner

        runner = Runner(config)
        size = runner.model.size
        return runner, size, 0, {"context_length": runner.n_ctx_seq}
