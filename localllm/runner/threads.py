"""A runner's worker thread: started by the first piece of work, ended once it has waited idle a while.

llama.cpp's CPU backend evaluates each batch on an OpenMP team of the calling thread. libgomp keeps a
thread's team until that thread ends, and once it keeps more threads than there are CPUs, every team
stops spinning between batches and sleeps instead, to be woken for the next one. A runner whose thread
stayed alive while idle so slowed every other runner: on 2 CPUs, SmolLM2 decoded 123 tokens/s alone, 85
beside an idle runner's thread, and 125 again once that thread had ended. So a runner's thread ends after
`IDLE_LINGER` seconds without work, and the next piece of work starts another.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

__all__ = ["IDLE_LINGER", "WorkerThread", "in_a_passing_thread"]

#: Seconds a worker thread waits for work before it ends: long enough to carry a burst of requests
#: over, short enough that an idle runner does not slow a busy one for long.
IDLE_LINGER = 0.25


class WorkerThread:
    """The thread that runs `target` while there is work; `wake` and `wait` are called with `condition` held.

    `target` loops: it waits for work with `wait`, and returns when `wait` says the thread has idled out.
    """

    def __init__(self, target: Callable[[], None], name: str, condition: threading.Condition) -> None:
        self._target = target
        self._name = name
        self._condition = condition
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        """Whether a thread is running (an idle runner has none)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def started(self) -> bool:
        """Whether a thread was started and has not idled out (it may have died of an error)."""
        return self._thread is not None

    def wake(self) -> None:
        """Work is queued: wake the thread, or start one."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._target, name=self._name, daemon=True)
            self._thread.start()
        else:
            self._condition.notify()

    def wait(self, has_work: Callable[[], bool]) -> bool:
        """Wait until `has_work()`; False when `IDLE_LINGER` seconds went by without: the thread must then
        return, and the next `wake` starts another. The condition is held throughout but while waiting, so
        no work can be queued unseen between the last look and the end."""
        while not has_work():
            if not self._condition.wait(IDLE_LINGER) and not has_work():
                self._thread = None
                return False
        return True

    def join(self) -> None:
        """Wait for the thread to end (not from the thread itself); call without the condition held."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()


def in_a_passing_thread(work: Callable[[], T]) -> T:
    """`work()` in a thread of its own that ends with it, and with the thread any OpenMP team the work
    made (loading a projector evaluates it once, as a warm-up); its exception is raised here."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # handed to the caller
            failure.append(exc)

    thread = threading.Thread(target=run, name="localllm-load", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
