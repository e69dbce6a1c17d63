"""Engine settings, specified once: each setting's argument, environment variables, parser and default.

A setting comes from the `Engine(...)` argument, else ``LOCALLLM_<NAME>``, else ``OLLAMA_<NAME>`` (read as
Ollama reads it: surrounding spaces and quotes dropped, durations for keep_alive, Go's booleans), else its
default. A value that does not parse raises `InvalidRequest` naming the argument or variable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

import attrs

from .errors import InputError, InvalidRequest
from .media import MediaLimits
from .scheduler.keepalive import parse_keep_alive

__all__ = [
    "ISOLATIONS",
    "KV_CACHE_TYPES",
    "NOT_READ",
    "SETTINGS",
    "EngineSettings",
    "Setting",
    "default_context_length",
    "read_setting",
]

ISOLATIONS = ("thread", "process")
"""Where text runners may run: worker threads of this process, or a child process each."""

KV_CACHE_TYPES = ("f16", "q8_0", "q4_0")
"""The KV cache types Ollama offers."""

GiB = 1 << 30

# Ollama's default context by the GPU memory there is (total, less the GPU overhead, all GPUs together): its
# thresholds sit a little under 48 and 24 GiB so that cards sold as such qualify.
_CONTEXT_TIERS = ((47 * GiB, 262_144), (23 * GiB, 32_768))
_SMALLEST_CONTEXT = 4096


def default_context_length(gpu_total_bytes: Mapping[int, int] | list[int], gpu_overhead: int) -> int:
    """Ollama's default num_ctx: 262144 with 47 GiB of GPU memory or more, 32768 with 23 GiB, else 4096.

    `gpu_total_bytes` lists each GPU's total memory; each counts less `gpu_overhead`. CPU only: 4096.
    """
    totals = gpu_total_bytes.values() if isinstance(gpu_total_bytes, Mapping) else gpu_total_bytes
    memory = sum(max(total - gpu_overhead, 0) for total in totals)
    return next((length for floor, length in _CONTEXT_TIERS if memory >= floor), _SMALLEST_CONTEXT)


# -- parsing what the environment says --------------------------------------------------------------------------

_TRUE = ("1", "t", "true", "yes", "on")
_FALSE = ("0", "f", "false", "no", "off")


def _text(value: str) -> str:
    """A variable's value as Ollama reads one: surrounding spaces, then quotes, dropped."""
    return value.strip().strip("\"'")


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("must be a whole number") from None


def _parse_bytes(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("must be a number of bytes") from None
    if not math.isfinite(value):
        raise ValueError("must be a number of bytes")
    return int(value)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("must be 1/0, true/false or on/off")


def _parse_auto_bool(text: str) -> bool | None:
    if text.lower() == "auto":
        return None
    try:
        return _parse_bool(text)
    except ValueError:
        raise ValueError("must be 1/0, true/false, on/off or auto") from None


def _parse_keep_alive(text: str) -> float:
    try:
        return parse_keep_alive(text, 300.0)
    except InputError:
        raise ValueError("must be seconds or a duration such as '5m' or '1h30m'") from None


def _parse_seconds(text: str) -> float:
    try:
        return parse_keep_alive(text, 0.0)
    except InputError:
        raise ValueError("must be seconds or a duration such as '30s' or '2m'") from None


def _parse_prompt_cache(text: str) -> bool | str:
    """Off, on (under the home), or a folder."""
    lowered = text.lower()
    if lowered in _FALSE:
        return False
    if lowered in _TRUE:
        return True
    return text


# -- checking a value, from an argument or a variable --------------------------------------------------------------


def _at_least(low: int, unit: str = "") -> Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"must be at least {low}{unit}")
        return value

    return check


def _optional_bool(value: object) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"must be True, False or None (auto), got {type(value).__name__}")
    return value


def _kv_cache_type(value: object) -> str:
    kind = str(value).lower()
    if kind not in KV_CACHE_TYPES:
        raise ValueError(f"must be {', '.join(KV_CACHE_TYPES[:-1])} or {KV_CACHE_TYPES[-1]}")
    return kind


def _isolation(value: object) -> str:
    if value not in ISOLATIONS:
        raise ValueError("must be 'thread' (runners in this process) or 'process' (a child process each)")
    return str(value)


def _keep_alive(value: object) -> float:
    if not isinstance(value, (int, float, str)):
        raise ValueError(f"must be seconds or a duration such as '5m', got {type(value).__name__}")
    return parse_keep_alive(value, 300.0)


def _positive_seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number of seconds, got {type(value).__name__}")
    if not 0 < value < math.inf:
        raise ValueError("must be more than 0 seconds, and finite")
    return float(value)


def _as_is(value: object) -> object:
    return value


@attrs.frozen
class Setting:
    """One engine setting: its `Engine` argument (None: environment only), variables, default and parsers."""

    name: str
    variables: tuple[str, ...]
    default: object
    parse: Callable[[str], object]  # a variable's text -> value; ValueError says what is expected
    check: Callable[[object], object] = _as_is  # a value (argument or parsed) -> the value kept; ValueError if bad
    argument: bool = True  # whether Engine(...) takes it
    doc_default: str = ""  # the default as the settings table writes it
    ollama_default: str | None = None  # Ollama's default where it differs from ours

    def from_environment(self, environ: Mapping[str, str] | None = None) -> tuple[str, object] | None:
        """(variable, value) from the first variable set, or None when none is."""
        environ = os.environ if environ is None else environ
        for variable in self.variables:
            text = _text(environ.get(variable, ""))
            if text:
                try:
                    return variable, self.check(self.parse(text))
                except (ValueError, InputError) as exc:
                    raise InvalidRequest(f"environment variable {variable} {_reason(exc)}, got {text!r}") from None
        return None

    def resolve(self, argument: object = None, environ: Mapping[str, str] | None = None) -> object:
        """The argument if given, else the environment, else the default."""
        if argument is not None:
            try:
                return self.check(argument)
            except (ValueError, InputError) as exc:
                raise InvalidRequest(f"{self.name} {_reason(exc)}, got {argument!r}") from None
        found = self.from_environment(environ)
        return self.default if found is None else found[1]


def _reason(exc: Exception) -> str:
    text = str(exc)
    return text if text.startswith("must") else f"is not valid ({text})"


def _setting(
    name: str,
    default: object,
    parse: Callable[[str], object],
    *,
    check: Callable[[object], object] = _as_is,
    ollama: bool = True,
    argument: bool = True,
    doc_default: str,
    ollama_default: str | None = None,
) -> Setting:
    """A setting read from LOCALLLM_<NAME>, then (with `ollama`) OLLAMA_<NAME>."""
    upper = name.upper()
    variables = (f"LOCALLLM_{upper}", f"OLLAMA_{upper}") if ollama else (f"LOCALLLM_{upper}",)
    return Setting(name, variables, default, parse, check, argument, doc_default, ollama_default)


SETTINGS: tuple[Setting, ...] = (
    _setting("home", None, str, ollama=False, doc_default="`~/.localllm`"),
    _setting("models", None, str, doc_default="`<home>/models`", ollama_default="`~/.ollama/models`"),
    _setting(
        "num_parallel",
        4,
        _parse_int,
        check=_at_least(1),
        doc_default="4",
        ollama_default="1",
    ),
    _setting("max_loaded_models", 0, _parse_int, check=_at_least(0), doc_default="0: 3 per GPU, 3 without one"),
    _setting("max_queue", 512, _parse_int, check=_at_least(1), doc_default="512"),
    _setting("keep_alive", 300.0, _parse_keep_alive, check=_keep_alive, doc_default="`5m`"),
    _setting(
        "context_length",
        0,
        _parse_int,
        check=_at_least(0),
        argument=False,
        doc_default="0: by GPU memory, 4096 / 32768 (23 GiB) / 262144 (47 GiB)",
    ),
    _setting("kv_cache_type", "f16", str, check=_kv_cache_type, doc_default="`f16`"),
    _setting("flash_attention", None, _parse_auto_bool, check=_optional_bool, doc_default="auto"),
    _setting("gpu_overhead", 0, _parse_bytes, check=_at_least(0, " bytes"), argument=False, doc_default="0 bytes"),
    _setting("sched_spread", False, _parse_bool, argument=False, doc_default="off"),
    _setting("repack", None, _parse_auto_bool, check=_optional_bool, ollama=False, doc_default="auto"),
    _setting("prompt_cache", False, _parse_prompt_cache, ollama=False, doc_default="off"),
    _setting("prompt_cache_size", GiB, _parse_bytes, check=_at_least(0, " bytes"), ollama=False, doc_default="1 GiB"),
    _setting("isolation", "thread", str, check=_isolation, ollama=False, doc_default="`thread`"),
    _setting(
        "runner_timeout",
        30.0,
        _parse_seconds,
        check=_positive_seconds,
        ollama=False,
        argument=False,
        doc_default="30 s: a runner process silent this long while it has work is killed",
    ),
)
"""Every engine setting, in the order the settings table lists them."""

_BY_NAME = {setting.name: setting for setting in SETTINGS}

NOT_READ: dict[str, str] = {
    "OLLAMA_HOST": "read by the `localllm` command (the server it talks to) and `localllm serve`, not the engine",
    "OLLAMA_ORIGINS": "read by the HTTP shim (the origins it allows), not the engine",
    "OLLAMA_LOAD_TIMEOUT": "loads run in this process (or a child it watches) and are not timed out",
    "OLLAMA_NOPRUNE": "localllm never prunes the store on start; a deleted or replaced model's unused blobs go at once",
    "OLLAMA_DEBUG": "localllm logs through Python's `logging` (logger `localllm`)",
    "OLLAMA_LLM_LIBRARY": "the backend is the installed llama-cpp-python build",
    "OLLAMA_VULKAN": "the backend is the installed llama-cpp-python build",
    "OLLAMA_IGPU_ENABLE": "the backend is the installed llama-cpp-python build",
    "OLLAMA_GO_TEMPLATE": "a Modelfile TEMPLATE is always rendered when a model has one",
    "OLLAMA_NEW_ENGINE": "llama.cpp runs every model",
    "OLLAMA_NOHISTORY": "the `localllm run` prompt saves no history file",
    "OLLAMA_REMOTES": "no cloud models",
    "OLLAMA_NO_CLOUD": "no cloud models",
    "OLLAMA_AUTH": "no cloud models",
    "OLLAMA_MAX_TRANSFER_STREAMS": "pulls fetch GGUF files, which Ollama does not cap either",
    "OLLAMA_DEBUG_LOG_REQUESTS": "no request log",
    "OLLAMA_EDITOR": "the `localllm run` prompt has no editor key",
}
"""Ollama's environment variables the engine does not read, and why."""


def read_setting(name: str, environ: Mapping[str, str] | None = None) -> object:
    """A setting from the environment alone, or its default (for code that runs without an `Engine`)."""
    return _BY_NAME[name].resolve(None, environ)


@attrs.frozen
class EngineSettings:
    """How an engine runs: where its store is, how many slots and models, and llama.cpp choices."""

    home: Path
    models: Path
    num_parallel: int
    max_loaded_models: int  # 0: 3 per GPU, 3 without one (as Ollama)
    max_queue: int
    keep_alive: float
    kv_cache_type: str
    flash_attention: bool | None  # None: as llama.cpp decides for the device
    repack: bool | None  # None: llama.cpp's weight repacking where this CPU and build run it safely
    prompt_cache_bytes: int = GiB  # RAM for saved prompt states; 0 keeps none
    prompt_cache_dir: Path | None = None  # where saved prompt states persist across restarts; None: nowhere
    isolation: str = "thread"  # where text runners run: "thread" (this process) or "process" (a child each)
    runner_timeout: float = 30.0  # seconds a runner process may stay silent while it has work, or take to answer
    context_length: int = 0  # the default num_ctx; 0: by GPU memory, as Ollama
    gpu_overhead: int = 0  # bytes kept free on every GPU
    sched_spread: bool = False  # place a model across every GPU, even when one would hold it
    media_limits: MediaLimits = attrs.field(factory=MediaLimits)  # bounds on the images and audio a request carries

    @property
    def prompt_cache_key(self) -> Path:
        """The secret that signs saved prompt states on disk: in the home, so entries from elsewhere never match."""
        return self.home / "prompt-cache.key"

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
        media_limits: MediaLimits | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> EngineSettings:
        def get(name: str, argument: object = None) -> object:
            return _BY_NAME[name].resolve(argument, environ)

        home_path = Path(cast("str | None", get("home", home)) or Path.home() / ".localllm").expanduser()
        models_path = Path(cast("str | None", get("models", models)) or home_path / "models").expanduser()
        return cls(
            home=home_path,
            models=models_path,
            num_parallel=cast("int", get("num_parallel", num_parallel)),
            max_loaded_models=cast("int", get("max_loaded_models", max_loaded_models)),
            max_queue=cast("int", get("max_queue", max_queue)),
            keep_alive=cast("float", get("keep_alive", keep_alive)),
            kv_cache_type=cast("str", get("kv_cache_type", kv_cache_type)),
            flash_attention=cast("bool | None", get("flash_attention", flash_attention)),
            repack=cast("bool | None", get("repack", repack)),
            prompt_cache_bytes=cast("int", get("prompt_cache_size", prompt_cache_size)),
            prompt_cache_dir=_prompt_cache_dir(cast("bool | str", get("prompt_cache", prompt_cache)), home_path),
            isolation=cast("str", get("isolation", isolation)),
            runner_timeout=cast("float", get("runner_timeout")),
            context_length=cast("int", get("context_length")),
            gpu_overhead=cast("int", get("gpu_overhead")),
            sched_spread=cast("bool", get("sched_spread")),
            media_limits=media_limits if media_limits is not None else MediaLimits.from_environment(environ),
        )


def _prompt_cache_dir(choice: bool | str | os.PathLike[str], home: Path) -> Path | None:
    """Where prompt states persist: off unless asked (True: under the home; a path: there)."""
    if choice is True:
        return home / "cache" / "prompts"
    if choice is False:
        return None
    return Path(choice).expanduser()
