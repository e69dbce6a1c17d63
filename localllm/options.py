"""Ollama's model options: names, types, defaults, merging, and which ones need a reload.

Options merge as ``defaults < model parameters < request``. Unknown keys warn
(Ollama ignores them too); a value of the wrong type raises ``InvalidOptions``
naming the key.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import attrs

from .errors import InvalidOptions

__all__ = ["LOAD_OPTIONS", "OPTION_TYPES", "Options", "merge_options", "parse_option_value"]

# name -> (type, default). The defaults are Ollama's.
_SPEC: dict[str, tuple[type, Any]] = {
    # load time
    "num_ctx": (int, 4096),
    "num_batch": (int, 512),
    "num_gpu": (int, -1),
    "main_gpu": (int, 0),
    "num_thread": (int, 0),
    "use_mmap": (bool, True),
    "use_mlock": (bool, False),
    "numa": (bool, False),
    "low_vram": (bool, False),
    # sampling / prediction
    "num_keep": (int, 4),
    "seed": (int, -1),
    "num_predict": (int, -1),
    "top_k": (int, 40),
    "top_p": (float, 0.9),
    "min_p": (float, 0.0),
    "typical_p": (float, 1.0),
    "repeat_last_n": (int, 64),
    "temperature": (float, 0.8),
    "repeat_penalty": (float, 1.1),
    "presence_penalty": (float, 0.0),
    "frequency_penalty": (float, 0.0),
    "penalize_newline": (bool, True),
    "stop": (list, ()),
}

OPTION_TYPES: dict[str, type] = {name: kind for name, (kind, _) in _SPEC.items()}

#: Options that change how a model is loaded: a different value needs another runner.
LOAD_OPTIONS: frozenset[str] = frozenset(
    {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock", "numa", "low_vram"}
)


def _coerce(name: str, value: Any) -> Any:
    kind = OPTION_TYPES[name]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is list:
        if isinstance(value, str):
            return (value,)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise InvalidOptions(f"option 'stop' must be a string or a list of strings, got {value!r}")
    raise InvalidOptions(f"option {name!r} must be of type {kind.__name__}, got {type(value).__name__} {value!r}")


def parse_option_value(name: str, text: str) -> Any:
    """Parse a textual value (a Modelfile PARAMETER, a CLI /set) into the option's type."""
    if name not in OPTION_TYPES:
        raise InvalidOptions(f"unknown option {name!r}; known options: {', '.join(sorted(OPTION_TYPES))}")
    kind = OPTION_TYPES[name]
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false"):
                raise ValueError(text)
            return lowered == "true"
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise InvalidOptions(f"option {name!r} expects {kind.__name__}, got {text!r}") from None
    return (text,)


def _validate(name: str, value: Any) -> None:
    problems = {
        "num_ctx": value if name == "num_ctx" and value < 1 else None,
        "num_batch": value if name == "num_batch" and value < 1 else None,
        "temperature": value if name == "temperature" and value < 0 else None,
        "top_p": value if name == "top_p" and not 0 <= value <= 1 else None,
        "min_p": value if name == "min_p" and not 0 <= value <= 1 else None,
        "typical_p": value if name == "typical_p" and not 0 < value <= 1 else None,
        "num_thread": value if name == "num_thread" and value < 0 else None,
        "repeat_last_n": value if name == "repeat_last_n" and value < -1 else None,
    }
    if problems.get(name) is not None:
        raise InvalidOptions(f"option {name!r} has an out-of-range value {value!r}")


@attrs.frozen
class Options:
    """A complete, validated set of options (every field has a value)."""

    num_ctx: int = _SPEC["num_ctx"][1]
    num_batch: int = _SPEC["num_batch"][1]
    num_gpu: int = _SPEC["num_gpu"][1]
    main_gpu: int = _SPEC["main_gpu"][1]
    num_thread: int = _SPEC["num_thread"][1]
    use_mmap: bool = _SPEC["use_mmap"][1]
    use_mlock: bool = _SPEC["use_mlock"][1]
    numa: bool = _SPEC["numa"][1]
    low_vram: bool = _SPEC["low_vram"][1]
    num_keep: int = _SPEC["num_keep"][1]
    seed: int = _SPEC["seed"][1]
    num_predict: int = _SPEC["num_predict"][1]
    top_k: int = _SPEC["top_k"][1]
    top_p: float = _SPEC["top_p"][1]
    min_p: float = _SPEC["min_p"][1]
    typical_p: float = _SPEC["typical_p"][1]
    repeat_last_n: int = _SPEC["repeat_last_n"][1]
    temperature: float = _SPEC["temperature"][1]
    repeat_penalty: float = _SPEC["repeat_penalty"][1]
    presence_penalty: float = _SPEC["presence_penalty"][1]
    frequency_penalty: float = _SPEC["frequency_penalty"][1]
    penalize_newline: bool = _SPEC["penalize_newline"][1]
    stop: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> Options:
        return merge_options(values)

    def load_key(self) -> tuple[tuple[str, Any], ...]:
        """The load-time options, as a hashable key: equal keys share a runner."""
        return tuple(sorted((name, getattr(self, name)) for name in LOAD_OPTIONS))

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["stop"] = list(self.stop)
        return data


def check_options(values: Mapping[str, Any] | None, *, source: str = "request") -> dict[str, Any]:
    """Validate a partial option mapping: coerce types, warn on unknown keys."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise InvalidOptions(f"options must be a mapping of option names to values, got {type(values).__name__}")
    checked: dict[str, Any] = {}
    for name, value in values.items():
        if name not in OPTION_TYPES:
            warnings.warn(f"ignoring unknown option {name!r} in {source}", UserWarning, stacklevel=3)
            continue
        if value is None:
            continue
        coerced = _coerce(name, value)
        _validate(name, coerced)
        checked[name] = coerced
    return checked


def merge_options(*layers: Mapping[str, Any] | None) -> Options:
    """Merge option layers, later ones winning, over Ollama's defaults."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(check_options(layer))
    return Options(**merged)
