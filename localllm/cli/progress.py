"""Progress of a pull or create: status lines and a bar per layer."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from .format import human_bytes

__all__ = ["Progress", "progress_callback"]


class Progress:
    """Status lines and a bar per layer, redrawn in place on a terminal, printed once per line otherwise."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.lines: dict[str, str] = {}  # key -> rendered line, in order of appearance
        self.done: set[str] = set()
        self._drawn = 0
        self._last_draw = 0.0

    def _bar(self, label: str, completed: int, total: int) -> str:
        fraction = min(max(completed / total, 0.0), 1.0) if total else 1.0
        width = 25
        filled = int(fraction * width)
        bar = "█" * filled + " " * (width - filled)
        size = human_bytes(total) if completed >= total else f"{human_bytes(completed)}/{human_bytes(total)}"
        return f"{label} {int(fraction * 100):3d}% ▕{bar}▏ {size}"

    def update(self, event: dict[str, Any]) -> None:
        status = str(event.get("status") or "")
        total = event.get("total")
        completed = event.get("completed")
        digest = event.get("digest")
        if isinstance(total, int) and total > 0:
            if not completed:
                return  # the announcement of a layer, before any byte of it
            if status.startswith("pulling") and isinstance(digest, str) and digest:
                key = digest
                label = f"pulling {digest.removeprefix('sha256:')[:12]}:"
            else:
                key = status.split(" sha256:", 1)[0]  # "copying file" and "copying file sha256:..." share a line
                label = f"{key}:"
            line = self._bar(label, int(completed), total)
            finished = int(completed) >= total
        else:
            if not status:
                return
            key, line, finished = "status:" + status, status, True
        previous = self.lines.get(key)
        self.lines[key] = line
        if self.tty:
            self._draw(force=finished and previous != line)
        elif finished and key not in self.done:
            self.out.write(line + "\n")
            self.out.flush()
        if finished:
            self.done.add(key)

    def _draw(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        parts = []
        if self._drawn:
            parts.append(f"\x1b[{self._drawn}A")
        for line in self.lines.values():
            parts.append("\r\x1b[2K" + line + "\n")
        self.out.write("".join(parts))
        self.out.flush()
        self._drawn = len(self.lines)

    def close(self) -> None:
        if self.tty:
            self._draw(force=True)


def progress_callback(display: Progress) -> Callable[[dict[str, Any]], None]:
    """The `progress=` callback for `Engine.pull` and `Engine.create` that feeds `display`."""

    def callback(event: dict[str, Any]) -> None:
        display.update(dict(event))

    return callback
