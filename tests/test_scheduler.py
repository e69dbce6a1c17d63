"""Scheduler unit tests with a fake runner (named as such): queue limits, keep_alive, eviction order."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import anyio
import pytest

from localllm import EngineClosed, InsufficientMemory, QueueFull
from localllm.scheduler.keepalive import parse_keep_alive
from localllm.scheduler.scheduler import Loaded, Scheduler


class FakeRunner:
    """Stands in for a loaded model: records that it was closed, and from which thread."""

    def __init__(self, key: Any) -> None:
        self.key = key
        self.closed = False
        self.pending_count = 0
        self.busy = False
        self.healthy = True

    def close(self) -> None:
        self.closed = True


class FakeLoader:
    def __init__(self, sizes: dict[Any, int] | None = None, gates: dict[Any, threading.Event] | None = None) -> None:
        self.loads: list[Any] = []
        self.runners: dict[Any, FakeRunner] = {}
        self.sizes = sizes or {}
        self.gates = gates or {}  # a key with a gate loads only once its event is set
        self.started = threading.Event()

    def __call__(self, key: Any) -> Loaded[FakeRunner]:
        self.started.set()
        if key in self.gates:
            self.gates[key].wait()
        self.loads.append(key)
        runner = FakeRunner(key)
        self.runners[key] = runner
        return Loaded(runner, self.sizes.get(key, 1))

    def size(self, key: Any) -> tuple[int, int]:
        return self.sizes.get(key, 1), 0


def test_parse_keep_alive() -> None:
    assert parse_keep_alive(None, 300.0) == 300.0
    assert parse_keep_alive(10, 300.0) == 10.0
    assert parse_keep_alive("5m", 0) == 300.0
    assert parse_keep_alive("1h30m", 0) == 5400.0
    assert parse_keep_alive("300ms", 0) == pytest.approx(0.3)
    assert parse_keep_alive("0", 300) == 0.0
    assert parse_keep_alive(-1, 300) == math.inf
    assert parse_keep_alive("-1m", 300) == math.inf
    assert parse_keep_alive(1e300, 300) == math.inf  # beyond what a Go duration holds: forever
    for bad in ("soon", "5 minutes", "1x", True, [1]):
        with pytest.raises(Exception, match="keep_alive"):
            parse_keep_alive(bad, 300)  # type: ignore[arg-type]


async def test_same_key_shares_a_runner_and_other_keys_load_another() -> None:
    loader = FakeLoader()
    scheduler = Scheduler(loader=loader, max_loaded=3)
    a = await scheduler.acquire("a", name="a", keep_alive=60)
    b = await scheduler.acquire("a", name="a", keep_alive=60)
    c = await scheduler.acquire("b", name="b", keep_alive=60)
    assert loader.loads == ["a", "b"]
    assert a.runner is b.runner is not c.runner
    for lease in (a, b, c):
        lease.release()
    await scheduler.close()
    assert all(r.closed for r in loader.runners.values())


async def test_keep_alive_zero_unloads_when_idle_and_latest_value_wins() -> None:
    loader = FakeLoader()
    scheduler = Scheduler(loader=loader)
    first = await scheduler.acquire("a", name="a", keep_alive=60)
    second = await scheduler.acquire("a", name="a", keep_alive=0)  # the latest request's value wins
    first.release()
    await anyio.sleep(0.05)
    assert "a" in scheduler.loaded, "a runner is never unloaded while a request uses it"
    second.release()
    with anyio.fail_after(2):
        while not loader.runners["a"].closed:
            await anyio.sleep(0.01)
    assert "a" not in scheduler.loaded
    await scheduler.close()


async def test_keep_alive_timer_runs_only_while_idle() -> None:
    loader = FakeLoader()
    scheduler = Scheduler(loader=loader)
    lease = await scheduler.acquire("a", name="a", keep_alive=0.2)
    await anyio.sleep(0.4)  # busy longer than keep_alive: must stay loaded
    assert "a" in scheduler.loaded
    released_at = time.monotonic()
    lease.release()
    with anyio.fail_after(3):
        while not loader.runners["a"].closed:
            await anyio.sleep(0.01)
    assert time.monotonic() - released_at >= 0.18
    await scheduler.close()


async def test_eviction_prefers_the_shortest_keep_alive_and_waits_for_busy_runners() -> None:
    loader = FakeLoader()
    scheduler = Scheduler(loader=loader, max_loaded=2)
    a = await scheduler.acquire("a", name="a", keep_alive=600)
    b = await scheduler.acquire("b", name="b", keep_alive=60)
    a.release()
    b.release()
    c = await scheduler.acquire("c", name="c", keep_alive=60)
    assert loader.runners["b"].closed and not loader.runners["a"].closed
    # Both loaded runners busy now: a fourth model waits until one is released.
    a2 = await scheduler.acquire("a", name="a", keep_alive=600)
    got: list[Any] = []

    async def want_d() -> None:
        got.append(await scheduler.acquire("d", name="d", keep_alive=60))

    async with anyio.create_task_group() as group:
        group.start_soon(want_d)
        await anyio.sleep(0.1)
        assert not got and "d" not in loader.runners
        c.release()
    assert got and loader.runners["c"].closed and not loader.runners["a"].closed
    got[0].release()
    a2.release()
    await scheduler.close()


async def test_queue_limit_applies_to_loaded_models_too() -> None:
    loader = FakeLoader()
    scheduler = Scheduler(loader=loader, max_queue=2)
    lease = await scheduler.acquire("a", name="a", keep_alive=60)
    lease.runner.pending_count = 2  # two requests already wait for a slot on the loaded runner
    with pytest.raises(QueueFull, match="max_queue=2"):
        await scheduler.acquire("a", name="a", keep_alive=60)
    lease.runner.pending_count = 1
    other = await scheduler.acquire("a", name="a", keep_alive=60)
    other.release()
    lease.release()
    await scheduler.close()


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    loader = FakeLoader()
    scheduler = Scheduler(loader=loader, max_loaded=1, max_queue=1)
    busy = await scheduler.acquire("a", name="a", keep_alive=60)
    with anyio.move_on_after(0.1):
        await scheduler.acquire("b", name="b", keep_alive=60)  # waits for room, then is cancelled
    # The cancelled waiter no longer counts: another request may queue.
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: scheduler.acquire("b", name="b", keep_alive=60))
        await anyio.sleep(0.05)
        with pytest.raises(QueueFull):
            await scheduler.acquire("c", name="c", keep_alive=60)
        busy.release()
    await scheduler.close()


async def test_a_model_that_can_never_fit_fails_at_once() -> None:
    loader = FakeLoader(sizes={"big": 10_000, "small": 10})
    scheduler = Scheduler(loader=loader, sizer=loader.size, memory_budget=lambda: 1_000)
    with pytest.raises(InsufficientMemory, match="10000"):
        await scheduler.acquire("big", name="big", keep_alive=60)
    lease = await scheduler.acquire("small", name="small", keep_alive=60)
    lease.release()
    await scheduler.close()


async def test_reaper_thread_is_joined_on_close() -> None:
    scheduler = Scheduler(loader=FakeLoader())
    (await scheduler.acquire("a", name="a", keep_alive=60)).release()
    assert any(t.name == "localllm-reaper" for t in threading.enumerate())
    await scheduler.close()
    assert not any(t.name == "localllm-reaper" for t in threading.enumerate())


async def test_close_unloads_everything_from_worker_threads() -> None:
    threads: list[str] = []

    class ThreadRecordingRunner(FakeRunner):
        def close(self) -> None:
            threads.append(threading.current_thread().name)
            super().close()

    scheduler = Scheduler(loader=lambda key: Loaded(ThreadRecordingRunner(key), 1))
    for key in ("a", "b"):
        (await scheduler.acquire(key, name=key, keep_alive=-1)).release()
    await scheduler.close()
    assert len(threads) == 2 and threading.current_thread().name not in threads
    assert not scheduler.loaded


async def test_a_slow_load_never_blocks_requests_for_loaded_runners() -> None:
    gate = threading.Event()
    loader = FakeLoader(gates={"slow": gate})
    scheduler = Scheduler(loader=loader, max_loaded=3)
    (await scheduler.acquire("fast", name="fast", keep_alive=60)).release()
    got: list[Any] = []
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: _append(got, scheduler.acquire("slow", name="slow", keep_alive=60)))
        await anyio.to_thread.run_sync(loader.started.wait)
        with anyio.fail_after(1):  # "slow" is still loading, "fast" is served at once
            lease = await scheduler.acquire("fast", name="fast", keep_alive=60)
        assert not got
        lease.release()
        gate.set()
    got[0].release()
    await scheduler.close()


async def test_requests_for_a_model_being_loaded_share_one_load() -> None:
    gate = threading.Event()
    loader = FakeLoader(gates={"a": gate})
    scheduler = Scheduler(loader=loader)
    got: list[Any] = []
    async with anyio.create_task_group() as group:
        for _ in range(3):
            group.start_soon(lambda: _append(got, scheduler.acquire("a", name="a", keep_alive=60)))
        await anyio.sleep(0.1)
        gate.set()
    assert loader.loads == ["a"] and len({lease.runner for lease in got}) == 1
    for lease in got:
        lease.release()
    await scheduler.close()


async def test_close_during_a_load_closes_the_runner_it_produced() -> None:
    gate = threading.Event()
    loader = FakeLoader(gates={"a": gate})
    scheduler = Scheduler(loader=loader)
    errors: list[BaseException] = []

    async def want_a() -> None:
        try:
            await scheduler.acquire("a", name="a", keep_alive=60)
        except EngineClosed as exc:
            errors.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(want_a)
        await anyio.to_thread.run_sync(loader.started.wait)
        threading.Timer(0.2, gate.set).start()
        await scheduler.close()  # returns only once the load is over and its runner closed
        assert loader.runners["a"].closed and not scheduler.loaded
    assert errors, "the request whose model loaded after close must fail, not be served"


async def test_a_failed_runner_is_dropped_and_the_next_request_loads_afresh() -> None:
    loader = FakeLoader()
    scheduler = Scheduler(loader=loader)
    lease = await scheduler.acquire("a", name="a", keep_alive=-1)
    lease.release()
    first = loader.runners["a"]
    first.healthy = False  # its worker thread died
    assert await scheduler.running() == []
    assert first.closed
    lease = await scheduler.acquire("a", name="a", keep_alive=-1)
    assert lease.runner is not first and loader.loads == ["a", "a"]
    assert [m.runner for m in await scheduler.running()] == [lease.runner]
    lease.release()
    await scheduler.close()


async def _append(into: list[Any], awaitable: Any) -> None:
    into.append(await awaitable)
