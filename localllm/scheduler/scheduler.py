"""The scheduler: which runners are loaded, who may use them, and when they go.

Events, as in Ollama's server/sched.go:

- *pending*: a request asks for a runner (`acquire`). It gets the loaded one
  with the same load configuration, or one is loaded for it — after evicting
  idle runners (shortest keep_alive first) when the new one does not fit, or
  waiting for busy ones to finish.
- *finished*: a request ends (`release`); the runner's keep_alive timer starts
  once no request is using it.
- *expired*: an idle runner's timer ran out; the expiry task unloads it.
- *unloaded*: a runner was closed; anything waiting for room tries again.

Runner loading and closing are blocking, so they run in worker threads.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import anyio
import attrs

from ..errors import EngineClosed, InsufficientMemory, QueueFull

__all__ = ["Lease", "LoadedModel", "RunnerLike", "Scheduler"]

logger = logging.getLogger("localllm.scheduler")


class RunnerLike(Protocol):
    """What the scheduler needs of a runner (the real one, or a fake in unit tests)."""

    @property
    def busy(self) -> bool: ...

    @property
    def pending_count(self) -> int: ...

    def close(self) -> None: ...


@attrs.define(eq=False)
class LoadedModel:
    """The scheduler's record of one loaded runner."""

    key: Any
    name: str
    runner: Any
    size: int = 0
    size_vram: int = 0
    info: dict[str, Any] = attrs.field(factory=dict)
    keep_alive: float = 300.0
    users: int = 0
    expires_at: float | None = None  # monotonic deadline while idle
    expires_wall: float | None = None  # the same moment as a wall-clock timestamp
    loaded_at: float = attrs.field(factory=time.time)
    closing: bool = False

    def stamp_expiry(self) -> None:
        if self.users > 0 or math.isinf(self.keep_alive):
            self.expires_at = None
            self.expires_wall = None if self.users > 0 else math.inf
        else:
            self.expires_at = time.monotonic() + self.keep_alive
            self.expires_wall = time.time() + self.keep_alive


@attrs.define(eq=False)
class Lease:
    """A request's hold on a runner; release it exactly once."""

    scheduler: Scheduler
    model: LoadedModel
    load_duration: int = 0
    released: bool = False

    @property
    def runner(self) -> Any:
        return self.model.runner

    def release(self, keep_alive: float | None = None) -> None:
        if not self.released:
            self.released = True
            self.scheduler._finished(self, keep_alive)


Loader = Callable[[Any], tuple[Any, int, int, dict[str, Any]]]
"""Loads a runner for a key (blocking): returns (runner, size bytes, VRAM bytes, info)."""

Sizer = Callable[[Any], tuple[int, int]]
"""Estimates (total bytes, VRAM bytes) a key would need once loaded (blocking)."""


class Scheduler:
    def __init__(
        self,
        *,
        loader: Loader,
        max_loaded: int = 3,
        max_queue: int = 512,
        memory_budget: Callable[[], int] | None = None,
        sizer: Sizer | None = None,
    ) -> None:
        self._loader = loader
        self._sizer = sizer
        self._memory_budget = memory_budget
        self.max_loaded = max_loaded
        self.max_queue = max_queue
        self.loaded: dict[Any, LoadedModel] = {}
        self.load_count = 0
        self._waiting = 0
        self._lock = anyio.Lock()
        self._changed = anyio.Event()  # set (and replaced) whenever a runner is released or unloaded
        self._closed = False

    # -- events -----------------------------------------------------------------

    async def acquire(
        self, key: Any, *, name: str, keep_alive: float, describe: dict[str, Any] | None = None
    ) -> Lease:
        """pending: get a lease on the runner for `key`, loading it if needed."""
        if self._closed:
            raise EngineClosed("the engine is closed")
        queued = self._waiting + sum(m.runner.pending_count for m in self.loaded.values())
        if queued >= self.max_queue:
            raise QueueFull(f"{queued} requests are already waiting (max_queue={self.max_queue}); retry later")
        self._waiting += 1
        try:
            return await self._acquire(key, name=name, keep_alive=keep_alive, describe=describe or {})
        finally:
            self._waiting -= 1

    async def _acquire(self, key: Any, *, name: str, keep_alive: float, describe: dict[str, Any]) -> Lease:
        while True:
            async with self._lock:
                model = self.loaded.get(key)
                if model is not None and not model.closing:
                    return self._lend(model, keep_alive, load_duration=0)
                if await self._make_room(key):
                    started = time.perf_counter()
                    runner, size, size_vram, info = await anyio.to_thread.run_sync(self._loader, key)
                    self.load_count += 1
                    info = {**describe, **info}
                    model = LoadedModel(key=key, name=name, runner=runner, size=size, size_vram=size_vram, info=info)
                    self.loaded[key] = model
                    logger.info("loaded %s (%d bytes, %d in VRAM)", name, size, size_vram)
                    return self._lend(model, keep_alive, load_duration=int((time.perf_counter() - started) * 1e9))
                changed = self._changed
            await changed.wait()  # busy runners hold the room we need: wait for one to finish

    def _lend(self, model: LoadedModel, keep_alive: float, *, load_duration: int) -> Lease:
        model.users += 1
        model.keep_alive = keep_alive  # the latest request's value wins
        model.stamp_expiry()
        return Lease(self, model, load_duration=load_duration)

    def _finished(self, lease: Lease, keep_alive: float | None) -> None:
        """finished: a request let go of its runner."""
        model = lease.model
        model.users -= 1
        if keep_alive is not None:
            model.keep_alive = keep_alive
        model.stamp_expiry()
        self._notify()

    async def _make_room(self, key: Any) -> bool:
        """Evict idle runners until `key` fits; False if it must wait for busy ones."""
        need, budget = 0, None
        if self._sizer is not None and self._memory_budget is not None:
            need, _vram = await anyio.to_thread.run_sync(self._sizer, key)
            budget = self._memory_budget()
            if need > budget + sum(m.size for m in self.loaded.values()):
                raise InsufficientMemory(
                    f"the model needs {_gib(need)} but only {_gib(budget)} of memory is available "
                    "even with every other model unloaded; use a smaller model, num_ctx or num_parallel"
                )

        def fits() -> bool:
            if len(self.loaded) >= self.max_loaded:
                return False
            if budget is not None:
                return need <= budget
            return True

        while not fits():
            idle = [m for m in self.loaded.values() if m.users == 0 and not m.closing]
            if not idle:
                return False
            victim = min(idle, key=lambda m: (m.keep_alive, m.loaded_at))
            await self._unload(victim)
            if budget is not None and self._memory_budget is not None:
                budget = self._memory_budget()
        return True

    async def expire(self) -> None:
        """expired: unload idle runners whose keep_alive ran out. Runs until cancelled."""
        while True:
            now = time.monotonic()
            deadlines = [m.expires_at for m in self.loaded.values() if m.users == 0 and m.expires_at is not None]
            due = [m for m in self.loaded.values() if m.users == 0 and m.expires_at is not None and m.expires_at <= now]
            for model in due:
                async with self._lock:
                    if model.users == 0 and model.key in self.loaded and not model.closing:
                        await self._unload(model)
            if due:
                continue
            changed = self._changed
            with anyio.move_on_after(max(0.0, min(deadlines) - now) if deadlines else math.inf):
                await changed.wait()

    async def _unload(self, model: LoadedModel) -> None:
        """unloaded: close a runner (nobody is using it) and wake whoever waits for room."""
        model.closing = True
        self.loaded.pop(model.key, None)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(model.runner.close)
        logger.info("unloaded %s", model.name)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # -- requests from the engine --------------------------------------------------

    async def unload_where(self, predicate: Callable[[LoadedModel], bool]) -> int:
        """Unload matching runners once they are idle (their users finish first)."""
        count = 0
        for model in [m for m in self.loaded.values() if predicate(m)]:
            if model.users == 0:
                async with self._lock:
                    if model.key in self.loaded and model.users == 0:
                        await self._unload(model)
                        count += 1
            else:
                model.keep_alive = 0.0  # unload as soon as its last request finishes
                count += 1
        return count

    async def close(self) -> None:
        """Unload everything and join every worker thread."""
        self._closed = True
        with anyio.CancelScope(shield=True):
            for model in list(self.loaded.values()):
                await self._unload(model)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB ({n} bytes)"
