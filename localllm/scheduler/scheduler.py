"""The scheduler: which runners are loaded, who may use them, and when they go.

Events, as in Ollama's server/sched.go:

- *pending*: a request asks for a runner (`acquire`). One runner per model: the
  `identity` of a key says which model it loads, the rest of the key are load
  options. A request gets the model's runner when its options match; when they
  differ (Ollama's needsReload) it waits for the runner's requests to finish,
  unloads it, and loads the model again with its own options. A model not
  loaded is loaded for it — after evicting idle runners (shortest keep_alive
  first) when it does not fit, or waiting for busy ones to finish.
- *finished*: a request ends (`release`); the runner's keep_alive timer starts
  once no request is using it.
- *expired*: an idle runner's timer ran out; the reaper unloads it.
- *unloaded*: a runner was closed; anything waiting for room tries again.

The queue bound (`max_queue`) counts every accepted request from `admit` until it ends, running or
waiting, so a burst beyond it fails at once with `QueueFull`.

Runner loading and closing are blocking, so they run in worker threads. Expiry needs a timer
that outlives any one request, so the scheduler owns one thread for it, the *reaper*: it sleeps
until the next deadline, asks the event loop which runners are due (the loop owns all scheduler
state), closes those, and tells the loop. Owning a thread instead of a task means the engine
needs no task group spanning the caller's code, so it also works cell by cell in a notebook.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

import anyio
import attrs

from ..errors import EngineClosed, InsufficientMemory, QueueFull
from ..loop import EventLoop
from .memory import LayerPlan

__all__ = ["Admission", "Identity", "Lease", "Loaded", "LoadedModel", "Loader", "RunnerLike", "Scheduler", "Sizer"]

logger = logging.getLogger("localllm.scheduler")


class RunnerLike(Protocol):
    """What the scheduler needs of a runner (a thread runner, an embedding runner, or a fake in unit tests)."""

    @property
    def busy(self) -> bool: ...

    @property
    def healthy(self) -> bool: ...

    def close(self) -> None: ...


R = TypeVar("R", bound=RunnerLike)
K = TypeVar("K", bound=Hashable)


@attrs.frozen
class Loaded(Generic[R]):
    """What a loader returns: the runner, what it occupies, and how it was placed."""

    runner: R
    size: int = 0
    size_vram: int = 0
    context_length: int = 0
    plan: LayerPlan | None = None


@attrs.define(eq=False)
class LoadedModel(Generic[K, R]):
    """The scheduler's record of one loaded runner."""

    key: K
    name: str
    loaded: Loaded[R]
    model_id: Hashable = None  # which model this runs: the scheduler's `identity` of the key
    keep_alive: float = 300.0
    users: int = 0
    expires_at: float | None = None  # monotonic deadline while idle
    expires_wall: float | None = None  # the same moment as a wall-clock timestamp
    loaded_at: float = attrs.field(factory=time.time)
    closing: bool = False

    @property
    def runner(self) -> R:
        return self.loaded.runner

    @property
    def size(self) -> int:
        return self.loaded.size

    @property
    def size_vram(self) -> int:
        return self.loaded.size_vram

    def stamp_expiry(self) -> None:
        if self.users > 0 or math.isinf(self.keep_alive):
            self.expires_at = None
            self.expires_wall = None if self.users > 0 else math.inf
        else:
            self.expires_at = time.monotonic() + self.keep_alive
            self.expires_wall = time.time() + self.keep_alive


@attrs.define(eq=False)
class _Loading:
    """A load in flight: what it reserved, and an event set when it is over (loaded or failed)."""

    need: int
    done: anyio.Event = attrs.field(factory=anyio.Event)


@attrs.define(eq=False)
class Lease(Generic[K, R]):
    """A request's hold on a runner; release it exactly once."""

    scheduler: Scheduler[K, R]
    model: LoadedModel[K, R]
    load_duration: int = 0
    released: bool = False

    @property
    def runner(self) -> R:
        return self.model.runner

    def release(self, keep_alive: float | None = None) -> None:
        if not self.released:
            self.released = True
            self.scheduler._finished(self, keep_alive)


class Admission:
    """A request's place under the queue bound, from acceptance to its end.

    As a context manager it gives the place back when the block ends, unless `keep` handed it on to
    whatever outlives the block (the request's job), which then calls `release`. Releasing is
    idempotent and safe from any thread (a stream may be dropped in another one).
    """

    def __init__(self, give_back: Callable[[], None]) -> None:
        self._give_back = give_back
        self._lock = threading.Lock()
        self._kept = False
        self._released = False

    def keep(self) -> None:
        """The block's end no longer releases the place: whoever called this calls `release` later."""
        self._kept = True

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._give_back()

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._kept:
            self.release()


Loader = Callable[[K], Loaded[R]]
"""Loads a runner for a key (blocking)."""

Sizer = Callable[[K], tuple[int, int]]
"""Estimates (total bytes, VRAM bytes) a key would need once loaded (blocking)."""

Identity = Callable[[K], Hashable]
"""Which model a key loads: keys with the same identity share one runner slot (their other fields are load options)."""


class Scheduler(Generic[K, R]):
    def __init__(
        self,
        *,
        loader: Loader[K, R],
        max_loaded: int = 3,
        max_queue: int = 512,
        memory_budget: Callable[[], int] | None = None,
        sizer: Sizer[K] | None = None,
        identity: Identity[K] | None = None,
    ) -> None:
        self._loader = loader
        self._sizer = sizer
        self._memory_budget = memory_budget
        self._identity: Identity[K] = identity if identity is not None else _itself
        self.max_loaded = max_loaded
        self.max_queue = max_queue
        self.loaded: dict[Hashable, LoadedModel[K, R]] = {}  # by model identity: one runner per model
        self._loading: dict[Hashable, _Loading] = {}  # by model identity, like `loaded`
        self.load_count = 0
        self._admitted = 0  # requests accepted and not yet ended (waiting or running)
        self._admitted_lock = threading.Lock()  # admissions end from any thread
        self._lock = anyio.Lock()
        self._changed = anyio.Event()  # set (and replaced) whenever a runner is released or unloaded
        self._closed = False
        self._reaper: _Reaper[K, R] | None = None
        self._loop: EventLoop | None = None

    # -- the queue bound ----------------------------------------------------------

    def admit(self) -> Admission:
        """Accept a request, or raise QueueFull when `max_queue` requests are already in flight.

        The place is held until the returned admission is released: every accepted request counts,
        waiting for a runner or running, so a burst beyond the bound is refused at once.
        """
        if self._closed:
            raise EngineClosed("the engine is closed")
        with self._admitted_lock:
            if self._admitted >= self.max_queue:
                raise QueueFull(
                    "server busy, please try again.  maximum pending requests exceeded "
                    f"({self._admitted} requests in flight, max_queue={self.max_queue})"
                )
            self._admitted += 1
        return Admission(self._end_admission)

    def _end_admission(self) -> None:
        with self._admitted_lock:
            self._admitted -= 1

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet ended."""
        return self._admitted

    # -- events -----------------------------------------------------------------

    async def acquire(self, key: K, *, name: str, keep_alive: float) -> Lease[K, R]:
        """pending: get a lease on the runner for `key`, loading (or reloading) the model if needed."""
        if self._closed:
            raise EngineClosed("the engine is closed")
        if self._reaper is None:
            self._loop = EventLoop()
            self._reaper = _Reaper(self, self._loop)
        model_id = self._identity(key)
        while True:
            if self._closed:
                raise EngineClosed("the engine is closed")
            await self.forget_failed()
            model = self.loaded.get(model_id)
            if model is not None and not model.closing:
                if model.key == key:
                    # As in Ollama, a request the runner suits uses it, even while another waits to reload it.
                    return self._lend(model, keep_alive, load_duration=0)
                await self._reload(model)
                continue
            loading = self._loading.get(model_id)
            if loading is not None:  # someone else is loading this model: see what they loaded
                await loading.done.wait()
                continue
            # Room decisions are made one at a time; the load itself runs outside the lock, so
            # requests for runners already loaded never wait on it.
            async with self._lock:
                if model_id in self.loaded or model_id in self._loading:
                    continue
                need = await self._make_room(key)
                if need is not None:
                    loading = self._loading[model_id] = _Loading(need)
                changed = self._changed
            if loading is None:
                await changed.wait()  # busy runners hold the room we need: wait for one to finish
                continue
            return await self._load(key, model_id, loading, name=name, keep_alive=keep_alive)

    async def _reload(self, model: LoadedModel[K, R]) -> None:
        """needsReload: the model runs with other load options. Unload it once its requests have finished
        (the caller then loads it with its own), or wait for the next of them to finish."""
        if model.users > 0:
            await self._changed.wait()
            return
        async with self._lock:
            if self.loaded.get(model.model_id) is model and model.users == 0 and not model.closing:
                logger.info("reloading %s with other load options", model.name)
                await self._unload(model)

    async def _load(
        self, key: K, model_id: Hashable, loading: _Loading, *, name: str, keep_alive: float
    ) -> Lease[K, R]:
        """Load a runner for `key` in a worker thread, and record it unless the engine closed meanwhile."""
        started = time.perf_counter()
        try:
            # Shielded: a cancelled caller must not leave a loaded runner that nobody records.
            with anyio.CancelScope(shield=True):
                loaded = await anyio.to_thread.run_sync(self._loader, key)
                if self._closed:
                    await anyio.to_thread.run_sync(loaded.runner.close)
                    raise EngineClosed("the engine was closed while the model was loading")
                self.load_count += 1
                model = LoadedModel(key=key, name=name, loaded=loaded, model_id=model_id)
                self.loaded[model_id] = model
                logger.info("loaded %s (%d bytes, %d in VRAM)", name, loaded.size, loaded.size_vram)
                lease = self._lend(model, keep_alive, load_duration=int((time.perf_counter() - started) * 1e9))
        finally:
            del self._loading[model_id]
            loading.done.set()
            self._notify()
        return lease

    async def forget_failed(self) -> None:
        """Unload runners whose worker died: their requests already failed, and the next one loads afresh."""
        for model in [m for m in self.loaded.values() if not m.closing and not m.runner.healthy]:
            logger.warning("dropping %s: its runner failed", model.name)
            await self._unload(model)

    async def running(self) -> list[LoadedModel[K, R]]:
        """The healthy loaded runners, oldest first."""
        await self.forget_failed()
        return sorted((m for m in self.loaded.values() if not m.closing), key=lambda m: m.loaded_at)

    def _lend(self, model: LoadedModel[K, R], keep_alive: float, *, load_duration: int) -> Lease[K, R]:
        model.users += 1
        model.keep_alive = keep_alive  # the latest request's value wins
        model.stamp_expiry()
        self._schedule_expiry()
        return Lease(self, model, load_duration=load_duration)

    def _finished(self, lease: Lease[K, R], keep_alive: float | None) -> None:
        """finished: a request let go of its runner."""
        if self._loop is not None and not self._loop.in_loop():
            # Released from another thread (a stream collected there): scheduler state lives in the loop.
            self._loop.call_soon(self._finished, lease, keep_alive)
            return
        model = lease.model
        model.users -= 1
        if keep_alive is not None:
            model.keep_alive = keep_alive
        model.stamp_expiry()
        self._notify()

    async def _make_room(self, key: K) -> int | None:
        """Evict idle runners until `key` fits: the bytes it needs, or None if it must wait for busy ones."""
        need, budget = 0, None
        reserved = sum(loading.need for loading in self._loading.values())  # loads in flight are not yet counted
        if self._sizer is not None and self._memory_budget is not None:
            need, _vram = await anyio.to_thread.run_sync(self._sizer, key)
            budget = self._memory_budget() - reserved
            if need > budget + sum(m.size for m in self.loaded.values()):
                raise InsufficientMemory(needed=need, available=budget)

        def fits() -> bool:
            if len(self.loaded) + len(self._loading) >= self.max_loaded:
                return False
            if budget is not None:
                return need <= budget
            return True

        while not fits():
            idle = [m for m in self.loaded.values() if m.users == 0 and not m.closing]
            if not idle:
                return None
            victim = min(idle, key=lambda m: (m.keep_alive, m.loaded_at))
            await self._unload(victim)
            if budget is not None and self._memory_budget is not None:
                budget = self._memory_budget() - reserved
        return need

    def _take_expired(self) -> list[LoadedModel[K, R]]:
        """expired (in the event loop, called by the reaper): detach idle runners whose time is up."""
        now = time.monotonic()
        due = [
            m
            for m in self.loaded.values()
            if m.users == 0 and not m.closing and m.expires_at is not None and m.expires_at <= now
        ]
        for model in due:
            model.closing = True
            del self.loaded[model.model_id]
        self._schedule_expiry()
        return due

    def _schedule_expiry(self) -> None:
        if self._reaper is not None:
            deadlines = [m.expires_at for m in self.loaded.values() if m.users == 0 and m.expires_at is not None]
            self._reaper.set_deadline(min(deadlines) if deadlines else None)

    async def _unload(self, model: LoadedModel[K, R]) -> None:
        """unloaded: close a runner (nobody is using it) and wake whoever waits for room."""
        model.closing = True
        if self.loaded.get(model.model_id) is model:
            del self.loaded[model.model_id]
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(model.runner.close)
        logger.info("unloaded %s", model.name)
        self._notify()

    def _notify(self) -> None:
        self._schedule_expiry()
        self._changed.set()
        self._changed = anyio.Event()

    # -- requests from the engine --------------------------------------------------

    async def unload_where(self, predicate: Callable[[LoadedModel[K, R]], bool]) -> int:
        """Unload matching runners once they are idle (their users finish first)."""
        count = 0
        for model in [m for m in self.loaded.values() if predicate(m)]:
            if model.users == 0:
                async with self._lock:
                    if self.loaded.get(model.model_id) is model and model.users == 0:
                        await self._unload(model)
                        count += 1
            else:
                model.keep_alive = 0.0  # unload as soon as its last request finishes
                count += 1
        self._schedule_expiry()
        return count

    async def close(self) -> None:
        """Unload everything and join every worker thread (the reaper's too).

        Loads in flight finish first and are closed straight away: nothing is left running.
        """
        self._closed = True
        self._notify()  # requests waiting for room see the engine closed
        with anyio.CancelScope(shield=True):
            while self._loading:
                await next(iter(self._loading.values())).done.wait()
            if self._reaper is not None:
                await anyio.to_thread.run_sync(self._reaper.stop)
            for model in list(self.loaded.values()):
                await self._unload(model)

    def release(self) -> None:
        """Close every runner now, from any thread, without the event loop: for an engine dropped unclosed.

        Nobody can be using the runners (their requests hold the engine), so nothing waits for them.
        The reaper is told to stop but not joined: it may be waiting on the event loop this runs in.
        """
        self._closed = True
        if self._reaper is not None:
            self._reaper.stop(wait=False)
        for model in list(self.loaded.values()):
            model.closing = True
            self.loaded.pop(model.model_id, None)
            try:
                model.runner.close()
            except Exception:
                logger.exception("closing %s failed", model.name)


class _Reaper(Generic[K, R]):
    """The thread that unloads runners when their keep_alive runs out."""

    def __init__(self, scheduler: Scheduler[K, R], loop: EventLoop) -> None:
        self._scheduler = scheduler
        self._loop = loop
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="localllm-reaper", daemon=True)
        self._thread.start()

    def set_deadline(self, deadline: float | None) -> None:
        with self._cond:
            if deadline != self._deadline:
                self._deadline = deadline
                self._cond.notify()

    def stop(self, *, wait: bool = True) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    deadline = self._deadline
                    wait = None if deadline is None else deadline - time.monotonic()
                    if wait is not None and wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stopping:
                    return
                self._deadline = None  # the loop sets the next one when it hands over what is due
            try:
                due = self._loop.call(self._scheduler._take_expired)
            except Exception:  # the event loop is gone: nothing left to serve
                return
            for model in due:
                try:
                    model.runner.close()
                    logger.info("unloaded %s (keep_alive expired)", model.name)
                except Exception:
                    logger.exception("closing %s failed", model.name)
            if due:
                try:
                    self._loop.call(self._scheduler._notify)
                except Exception:
                    return


def _itself(key: Hashable) -> Hashable:
    """The default identity: every key is a model of its own."""
    return key


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB ({n} bytes)"
