"""Calling into the event loop from worker threads: the one place that does it.

Runners and the scheduler's reaper run in plain threads; the state they report to lives in the event
loop. `EventLoop` is captured inside the loop and then used from any thread: `call_soon` schedules a
function without waiting (a decode loop must never wait on the event loop's latency), `call` runs one
and returns its result.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import anyio.from_thread
import anyio.lowlevel

__all__ = ["EventLoop", "LoopGone"]

T = TypeVar("T")
P = ParamSpec("P")

LoopGone = (RuntimeError, anyio.from_thread.RunFinishedError)
"""What calling into an event loop that has stopped raises."""


class EventLoop:
    """The event loop current where it was created, callable from any thread."""

    def __init__(self) -> None:
        self._token = anyio.lowlevel.current_token()
        self._thread = threading.get_ident()

    def in_loop(self) -> bool:
        """Whether the caller runs in the event loop's own thread."""
        return threading.get_ident() == self._thread

    def call_soon(self, func: Callable[P, object], *args: P.args, **kwargs: P.kwargs) -> None:
        """Schedule `func(*args)` in the loop without waiting; raises one of `LoopGone` if it has stopped."""
        self._token.backend_class.run_sync_soon(functools.partial(func, *args, **kwargs), (), self._token.native_token)

    def call(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `func(*args)` in the loop and return its result (from a thread other than the loop's)."""
        return anyio.from_thread.run_sync(functools.partial(func, *args, **kwargs), token=self._token)
