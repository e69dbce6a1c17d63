"""keep_alive values as Ollama reads them: seconds, durations like "1h30m", negative = forever."""

from __future__ import annotations

import math
import re

from ..errors import InvalidOptions

__all__ = ["parse_keep_alive"]

_LONGEST = (2**63 - 1) / 1e9  # seconds

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_keep_alive(value: float | int | str | None, default: float) -> float:
    """Seconds to keep a model loaded once idle; `math.inf` means forever, 0 means unload at once."""
    if value is None:
        return default
    if isinstance(value, bool):
        raise InvalidOptions(f"keep_alive must be a number of seconds or a duration like '5m', got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds = _parse_duration(text)
    else:
        raise InvalidOptions(f"keep_alive must be a number of seconds or a duration like '5m', got {value!r}")
    if math.isnan(seconds):
        raise InvalidOptions("keep_alive must not be NaN")
    # Negative, or longer than a Go duration holds (about 292 years, as Ollama reads it): forever.
    return math.inf if seconds < 0 or seconds > _LONGEST else seconds


def _parse_duration(text: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    position, total = 0, 0.0
    for match in _PART.finditer(body):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if not body or position != len(body):
        raise InvalidOptions(f"keep_alive {text!r} is not a duration; use seconds or forms like '300ms', '5m', '1h30m'")
    return sign * total
