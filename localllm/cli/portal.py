"""An Engine running on an event loop in a background thread, called from the terminal's thread."""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, TypeVar

import anyio.from_thread

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

    from ..engine import Engine

__all__ = ["open_engine", "wait"]

T = TypeVar("T")


@contextlib.contextmanager
def open_engine() -> Iterator[tuple[Engine, BlockingPortal]]:
    """An Engine on a background event loop, and the portal to call it through.

    The main thread stays free for the terminal (readline, Ctrl-C).
    """
    from ..engine import Engine

    with anyio.from_thread.start_blocking_portal() as portal, portal.wrap_async_context_manager(Engine()) as engine:
        yield engine, portal


def wait(future: concurrent.futures.Future[T]) -> T:
    """The result of a task on the portal; Ctrl-C cancels the task (freeing its slot) and re-raises."""
    try:
        return future.result()
    except KeyboardInterrupt:
        future.cancel()
        with contextlib.suppress(BaseException):
            future.result(timeout=30)
        raise
