"""Ollama's model options: names, types, defaults, merging, and which ones need a reload.

Options merge as ``defaults < model parameters < request``. Unknown keys warn
(Ollama ignores them too); a value of the wrong type raises ``InvalidOptions``
naming the key.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, cast

import attrs

from .errors import InvalidOptions

__all__ = [
    "LOAD_OPTIONS",
    "OPTION_TYPES",
    "RUNNER_LOAD_OPTIONS",
    "OptionValues",
    "Options",
    "merge_options",
    "parse_option_value",
    "runner_load_values",
]


#: llama.cpp takes integer options as C ints and real ones as C floats: beyond those, a value would
#: wrap around or turn infinite on its way there.
_C_INT_MIN, _C_INT_MAX = -(1 << 31), (1 << 31) - 1
_C_FLOAT_MAX = 3.4028234663852886e38

#: ggml's GGML_MAX_N_THREADS: llama.cpp cannot run more threads than this.
MAX_THREADS = 512


def _option(
    default: object,
    *,
    load: bool = False,
    resolved: bool = False,
    valid: Callable[[Any], bool] | None = None,
    wraps: bool = False,
) -> Any:
    """One option's specification: its default (Ollama's), whether a change needs another runner
    (`load`), whether a runner gets not the value but what it resolves to (`resolved`: a model name
    becomes a file), which values are in range (`valid`), and whether an integer may exceed a C int
    because only its low 32 bits are used (`wraps`). The field's annotation is its type."""
    return attrs.field(default=default, metadata={"load": load, "resolved": resolved, "valid": valid, "wraps": wraps})


@attrs.frozen
class Options:
    """A complete, validated set of options (every field has a value): the one specification of options."""

    # Load time: a runner is loaded with these, so a different value needs another runner.
    num_ctx: int = _option(4096, load=True, valid=lambda v: v >= 1)
    num_batch: int = _option(512, load=True, valid=lambda v: 1 <= v <= 1 << 20)
    num_gpu: int = _option(-1, load=True, valid=lambda v: v >= -1)
    main_gpu: int = _option(0, load=True, valid=lambda v: v >= 0)
    num_thread: int = _option(0, load=True, valid=lambda v: 0 <= v <= MAX_THREADS)
    use_mmap: bool = _option(True, load=True)
    use_mlock: bool = _option(False, load=True)
    # Speculative decoding: a small draft model (name or path, same vocabulary; "" for none), how many
    # tokens it may draft per step, and drafting from the sequence's own text when there is no draft model.
    draft_model: str = _option("", load=True, resolved=True)  # the runner gets the file it names
    draft_max: int = _option(8, load=True, valid=lambda v: 1 <= v <= 64)
    prompt_lookup: bool = _option(False, load=True)
    numa: bool = _option(False)  # accepted as Ollama does; llama.cpp's NUMA mode is process-wide
    low_vram: bool = _option(False)  # accepted as Ollama does; no effect
    # Per request: prediction and sampling.
    num_keep: int = _option(4)
    seed: int = _option(-1, wraps=True)
    num_predict: int = _option(-1)
    top_k: int = _option(40)
    top_p: float = _option(0.9, valid=lambda v: 0 <= v <= 1)
    min_p: float = _option(0.0, valid=lambda v: 0 <= v <= 1)
    typical_p: float = _option(1.0, valid=lambda v: 0 < v <= 1)
    repeat_last_n: int = _option(64, valid=lambda v: v >= -1)
    temperature: float = _option(0.8, valid=lambda v: v >= 0)
    repeat_penalty: float = _option(1.0)
    presence_penalty: float = _option(0.0)
    frequency_penalty: float = _option(0.0)
    penalize_newline: bool = _option(True)
    stop: tuple[str, ...] = attrs.field(
        default=(), converter=tuple, metadata={"load": False, "valid": None, "wraps": False}
    )

    @classmethod
    def from_mapping(cls, values: OptionValues | None) -> Options:
        return merge_options(values)

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["stop"] = list(self.stop)
        return data


attrs.resolve_types(Options)
_FIELDS: dict[str, attrs.Attribute[Any]] = {field.name: field for field in attrs.fields(Options)}

#: Each option's type (`list` for stop sequences, given as a string or a list of strings).
OPTION_TYPES: dict[str, type] = {
    name: list if name == "stop" else cast(type, field.type) for name, field in _FIELDS.items()
}

#: Options that change how a model is loaded: a different value needs another runner.
LOAD_OPTIONS: frozenset[str] = frozenset(name for name, field in _FIELDS.items() if field.metadata["load"])

#: The load options a runner is loaded with as they are: `LoadConfig` has a field of the same name for each,
#: and takes their values from here (the resolved ones reach it as what they resolve to).
RUNNER_LOAD_OPTIONS: tuple[str, ...] = tuple(
    name for name, field in _FIELDS.items() if field.metadata["load"] and not field.metadata["resolved"]
)


def runner_load_values(options: Options) -> dict[str, Any]:
    """The values of `options`' runner load options, by name: the LoadConfig fields of the same names."""
    return {name: getattr(options, name) for name in RUNNER_LOAD_OPTIONS}


OptionValues = Mapping[str, Any] | Options
"""What the API takes as options: a (partial) mapping of Ollama's option names, or a complete `Options`."""


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
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is list:
        if isinstance(value, str):
            return (value,)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise InvalidOptions(f"option 'stop' must be a string or a list of strings, got {value!r}")
    raise InvalidOptions(f"option {name!r} must be of type {kind.__name__}, got {type(value).__name__} {value!r}")


def parse_option_value(name: str, text: str) -> Any:
    """Parse a textual value (a Modelfile PARAMETER, a CLI /set) into the option's type, in range."""
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
            value: Any = int(text)
        elif kind is float:
            value = float(text)
        elif kind is str:
            return text.strip()
        else:
            return (text,)
    except ValueError:
        raise InvalidOptions(f"option {name!r} expects {kind.__name__}, got {text!r}") from None
    _validate(name, value)
    return value


def _fits_c_type(name: str, value: Any) -> bool:
    kind = OPTION_TYPES[name]
    if kind is int:
        return _FIELDS[name].metadata["wraps"] or _C_INT_MIN <= value <= _C_INT_MAX
    if kind is float:
        return math.isfinite(value) and abs(value) <= _C_FLOAT_MAX
    return True


def _validate(name: str, value: Any) -> None:
    valid = _FIELDS[name].metadata["valid"]
    if not _fits_c_type(name, value) or (valid is not None and not valid(value)):
        raise InvalidOptions(f"option {name!r} has an out-of-range value {value!r}")


def check_options(values: OptionValues | None, *, source: str = "request") -> dict[str, Any]:
    """Validate a partial option mapping (or take a complete `Options`): coerce types, warn on unknown keys."""
    if values is None:
        return {}
    if isinstance(values, Options):
        return {field.name: getattr(values, field.name) for field in attrs.fields(Options)}
    if not isinstance(values, Mapping):
        raise InvalidOptions(f"options must be a mapping of option names to values, got {type(values).__name__}")
    checked: dict[str, Any] = {}
    for name, value in values.items():
        if name not in OPTION_TYPES:
            warnings.warn(
                f"ignoring unknown option {name!r} in {source}", UserWarning, stacklevel=_outside_stacklevel()
            )
            continue
        if value is None:
            continue
        coerced = _coerce(name, value)
        _validate(name, coerced)
        checked[name] = coerced
    return checked


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # the localllm package's folder


def _outside_stacklevel() -> int:
    """The stack level of the first caller outside this package (and the code attrs generates), for
    warnings that point at the user's line whichever front door the options came through."""
    frame = sys._getframe(2)  # the caller of the function that warns
    level = 2
    while frame.f_back is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE) or frame.f_code.co_filename.startswith("<attrs generated")
    ):
        frame, level = frame.f_back, level + 1
    return level


def merge_options(*layers: OptionValues | None) -> Options:
    """Merge option layers, later ones winning, over Ollama's defaults."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(check_options(layer))
    return Options(**merged)
