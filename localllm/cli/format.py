"""How the command prints values: sizes, times and durations as Ollama prints them, tables, model details."""

from __future__ import annotations

import datetime as _dt
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from ..types import ShowResponse

__all__ = ["go_duration", "human_bytes", "human_time", "parse_time", "processor", "show_info", "table", "until"]


def human_bytes(size: int) -> str:
    """Sizes as Ollama prints them: decimal units, no decimals from 10 up."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            value = size / scale
            if value >= 10 or value == int(value):
                return f"{int(value)} {unit}"
            return f"{value:.1f} {unit}"
    return f"{size} B"


def _human_duration(seconds: float) -> str:
    whole = int(seconds)
    if whole < 1:
        return "Less than a second"
    if whole == 1:
        return "1 second"
    if whole < 60:
        return f"{whole} seconds"
    minutes = whole // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 14:
        return f"{hours // 24} days"
    if hours < 24 * 60:
        return f"{hours // (24 * 7)} weeks"
    if hours < 24 * 730:
        return f"{hours // (24 * 30)} months"
    return f"{whole // (3600 * 24 * 365)} years"


def parse_time(value: str | _dt.datetime | None) -> _dt.datetime | None:
    """An ISO 8601 timestamp (``Z`` allowed) as an aware datetime; None when absent or unreadable."""
    if not value:
        return None
    if isinstance(value, _dt.datetime):
        return value
    try:
        parsed = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.astimezone()
    return parsed


def human_time(value: str | _dt.datetime | None, zero: str = "Never") -> str:
    """``2 minutes ago``, ``4 minutes from now``, ``Forever``."""
    moment = parse_time(value)
    if moment is None or moment.year <= 1:
        return zero
    delta = (_dt.datetime.now(_dt.timezone.utc) - moment).total_seconds()
    if delta < -20 * 365 * 24 * 3600:
        return "Forever"
    if delta < 0:
        return _human_duration(-delta) + " from now"
    return _human_duration(delta) + " ago"


def go_duration(ns: int | None) -> str:
    """A duration in nanoseconds as Go prints one (``1.234s``, ``56.7ms``)."""
    if not ns:
        return "0s"

    def trim(value: float, digits: int) -> str:
        text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
        return text or "0"

    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return trim(ns / 1e3, 3) + "µs"
    if ns < 1_000_000_000:
        return trim(ns / 1e6, 6) + "ms"
    seconds = ns / 1e9
    if seconds < 60:
        return trim(seconds, 9) + "s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{int(minutes)}m{trim(secs, 9)}s"
    return f"{int(hours)}h{text}" if hours else text


def processor(size: int, vram: int) -> str:
    """Where a loaded model lives: ``100% GPU``, ``100% CPU`` or the split."""
    if vram == 0:
        return "100% CPU"
    if vram == size:
        return "100% GPU"
    if vram > size or size == 0:
        return "Unknown"
    cpu = round((size - vram) / size * 100)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


def until(expires_at: str | _dt.datetime | None) -> str:
    """When a loaded model will be unloaded."""
    moment = parse_time(expires_at)
    if moment is None:
        return "Never"
    if moment < _dt.datetime.now(_dt.timezone.utc):
        return "Stopping..."
    return human_time(moment)


def table(rows: Sequence[Sequence[str]], *, indent: bool = False, out: TextIO | None = None) -> None:
    """Left-aligned columns separated by four spaces, no borders (Ollama's tables)."""
    stream = out or sys.stdout
    if not rows:
        return
    widths = [max(len(row[i]) if i < len(row) else 0 for row in rows) for i in range(max(len(r) for r in rows))]
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        line = "    ".join(cells).rstrip()
        stream.write(("    " + line if indent else line) + "\n")


def _model_rows(info: ShowResponse) -> list[list[str]]:
    details = info.details
    model_info = info.modelinfo or {}
    arch = str(model_info.get("general.architecture") or "")
    rows: list[list[str]] = []
    if arch:
        rows.append(["", "architecture", arch])
    else:
        rows.append(["", "architecture", str(details.family or "")])
    params = details.parameter_size or ""
    if not params and model_info.get("general.parameter_count"):
        params = str(model_info["general.parameter_count"])
    if params:
        rows.append(["", "parameters", params])
    for key, label in (("context_length", "context length"), ("embedding_length", "embedding length")):
        value = model_info.get(f"{arch}.{key}")
        if value is not None:
            rows.append(["", label, str(value)])
    rows.append(["", "quantization", str(details.quantization_level or "")])
    return rows


def _head(text: str, count: int) -> list[list[str]]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    rows = [["", line] for line in lines[:count]]
    if len(lines) > count:
        rows.append(["", "..."])
    return rows


def show_info(info: ShowResponse, *, verbose: bool = False, out: TextIO | None = None) -> None:
    """A model's details in sections, as ``ollama show`` prints them."""
    stream = out or sys.stdout

    def section(title: str, rows: list[list[str]]) -> None:
        stream.write(f"  {title}\n")
        table(rows, out=stream)
        stream.write("\n")

    section("Model", _model_rows(info))
    if info.capabilities:
        section("Capabilities", [["", str(c)] for c in info.capabilities])
    if info.parameters:
        section("Parameters", [["", *line.split(None, 1)] for line in info.parameters.splitlines() if line.strip()])
    if verbose and info.modelinfo:
        rows = []
        for key in sorted(info.modelinfo):
            value = info.modelinfo[key]
            if isinstance(value, (list, tuple)):
                text = (
                    "["
                    + " ".join(str(v) for v in value[:3])
                    + (f" ...+{len(value) - 3} more]" if len(value) > 3 else "]")
                )
            else:
                text = json.dumps(value) if isinstance(value, bool) or value is None else str(value)
            rows.append(["", key, text])
        section("Metadata", rows)
    if verbose and info.tensors:
        section("Tensors", [["", t.name, t.type, "[" + " ".join(str(n) for n in t.shape) + "]"] for t in info.tensors])
    if info.system:
        section("System", _head(info.system, 2))
    if info.license:
        section("License", _head(info.license, 2))
