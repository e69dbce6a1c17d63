"""Hand-off from a worker thread to a coroutine without blocking either side."""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

import anyio

from ..loop import EventLoop, LoopGone

__all__ = ["Mailbox"]

T = TypeVar("T")


class Mailbox(Generic[T]):
    """A queue filled by a thread and drained by one coroutine.

    `put` never waits for the event loop: when the reader is waiting, it
    schedules the wake-up with `EventLoop.call_soon` (a blocking call would tie
    the decode loop to the event loop's latency). Create it from inside the
    event loop.
    """

    def __init__(self) -> None:
        self._loop = EventLoop()
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._waiter: anyio.Event | None = None

    def put(self, item: T) -> None:
        """Called from the worker thread."""
        with self._lock:
            self._items.append(item)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            try:
                self._loop.call_soon(waiter.set)
            except LoopGone:
                pass  # the loop is gone; nobody is waiting any more

    async def get_all(self) -> list[T]:
        """Wait until there is at least one item; return all items queued so far."""
        while True:
            with self._lock:
                if self._items:
                    items = list(self._items)
                    self._items.clear()
                    return items
                waiter = self._waiter = anyio.Event()
            await waiter.wait()
