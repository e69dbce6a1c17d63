"""Engine settings: constructor arguments over environment variables over defaults."""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from .errors import InvalidRequest, LocalLLMError
from .scheduler.keepalive import parse_keep_alive

__all__ = ["ISOLATIONS", "EngineSettings"]

ISOLATIONS = ("thread", "process")
"""Where text runners may run: worker threads of this process, or a child process each."""


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
    """How an engine runs: where its store is, how many slots and models, and llama.cpp choices."""

    home: Path
    models: Path
    num_parallel: int
    max_loaded_models: int
    max_queue: int
    keep_alive: float
    kv_cache_type: str
    flash_attention: bool | None  # None: as llama.cpp decides for the device
    repack: bool | None  # None: llama.cpp's weight repacking where this CPU and build run it safely
    prompt_cache_bytes: int = 1 << 30  # RAM for saved prompt states; 0 keeps none
    prompt_cache_dir: Path | None = None  # where saved prompt states persist across restarts; None: nowhere
    isolation: str = "thread"  # where text runners run: "thread" (this process) or "process" (a child each)

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
        prompt_cache: bool | str | os.PathLike[str] | None = None,
        prompt_cache_size: int | None = None,
        isolation: str | None = None,
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
            flash_attention = _env_bool("LOCALLLM_FLASH_ATTENTION")
        if repack is None:
            repack = _env_bool("LOCALLLM_REPACK")
        cache_bytes = (
            prompt_cache_size if prompt_cache_size is not None else _env_int("LOCALLLM_PROMPT_CACHE_SIZE", 1 << 30)
        )
        if cache_bytes < 0:
            raise InvalidRequest(f"prompt_cache_size must be at least 0 bytes, got {cache_bytes}")
        where = isolation if isolation is not None else os.environ.get("LOCALLLM_ISOLATION") or "thread"
        if where not in ISOLATIONS:
            source = "isolation" if isolation is not None else "environment variable LOCALLLM_ISOLATION"
            raise InvalidRequest(
                f"{source} must be 'thread' (runners in this process) or 'process' (a child process each), "
                f"got {where!r}"
            )
        return cls(
            home_path,
            models_path,
            parallel,
            loaded,
            queue,
            alive,
            kv_type,
            flash_attention,
            repack,
            cache_bytes,
            _prompt_cache_dir(prompt_cache, home_path),
            where,
        )


def _prompt_cache_dir(choice: bool | str | os.PathLike[str] | None, home: Path) -> Path | None:
    """Where prompt states persist: off unless asked (True: under the home; a path: there)."""
    if choice is None:
        value = os.environ.get("LOCALLLM_PROMPT_CACHE", "").strip()
        if value.lower() in ("", "0", "false", "no", "off"):
            choice = False
        elif value.lower() in ("1", "true", "yes", "on"):
            choice = True
        else:
            choice = value
    if choice is True:
        return home / "cache" / "prompts"
    if choice is False:
        return None
    return Path(choice).expanduser()
