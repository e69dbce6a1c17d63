"""Scheduler unit tests with a fake runner (named as such): one runner per model, queue limits, keep_alive,
eviction order."""

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

pytestmark = pytest.mark.fast


class FakeRunner:
    """Stands in for a loaded model: records that it was closed, and from which thread."""

    def __init__(self, key: Any) -> None:
        self.key = key
        self.closed = False
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


async def test_the_queue_bound_counts_every_accepted_request_until_it_ends() -> None:
    loader = FakeLoader()
    scheduler = Scheduler(loader=loader, max_queue=2)
    running = scheduler.admit()
    lease = await scheduler.acquire("a", name="a", keep_alive=60)  # running on a loaded runner: still counted
    with scheduler.admit():  # accepted, not yet leased
        with pytest.raises(QueueFull, match=r"maximum pending requests exceeded .*max_queue=2"):
            scheduler.admit()
    with scheduler.admit() as kept:  # a place handed on outlives its block
        kept.keep()
    with pytest.raises(QueueFull):
        scheduler.admit()
    kept.release()
    kept.release()  # idempotent: gives back one place only
    lease.release()
    running.release()
    assert scheduler.in_flight == 0
    await scheduler.close()


async def test_a_request_failing_or_cancelled_inside_its_admission_gives_its_place_back() -> None:
    scheduler = Scheduler(loader=FakeLoader(), max_queue=1)
    with pytest.raises(RuntimeError), scheduler.admit():
        raise RuntimeError("the request failed")
    with anyio.CancelScope() as scope, scheduler.admit():
        scope.cancel()
        await anyio.sleep_forever()
    assert scheduler.in_flight == 0
    scheduler.admit().release()  # the place is free again
    await scheduler.close()


async def test_an_admission_released_from_another_thread_is_counted_once() -> None:
    scheduler = Scheduler(loader=FakeLoader(), max_queue=64)
    admissions = [scheduler.admit() for _ in range(64)]
    threads = [threading.Thread(target=a.release) for a in admissions for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert scheduler.in_flight == 0
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

    scheduler: Scheduler[str, FakeRunner] = Scheduler(loader=lambda key: Loaded(ThreadRecordingRunner(key), 1))
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


# -- one runner per model ----------------------------------------------------------


def by_model(key: tuple[str, int]) -> str:
    """Keys are (model, num_ctx): the model is what identifies a runner, num_ctx is a load option."""
    return key[0]


async def test_other_load_options_wait_for_the_busy_runner_then_reload_once() -> None:
    loader = FakeLoader()
    scheduler = Scheduler(loader=loader, identity=by_model)
    first = await scheduler.acquire(("m", 256), name="m", keep_alive=60)
    old = first.runner
    got: list[Any] = []
    async with anyio.create_task_group() as group:
        group.start_soon(_append, got, scheduler.acquire(("m", 512), name="m", keep_alive=60))
        await anyio.wait_all_tasks_blocked()
        assert not got and loader.loads == [("m", 256)], "the busy runner is never unloaded under a request"
        # As in Ollama, a request the old runner suits still uses it meanwhile.
        same = await scheduler.acquire(("m", 256), name="m", keep_alive=60)
        assert same.runner is old
        first.release()
        await anyio.wait_all_tasks_blocked()
        assert not got, "the reload waits for every request on the old runner"
        same.release()
    (reloaded,) = got
    assert old.closed and reloaded.runner.key == ("m", 512)
    assert loader.loads == [("m", 256), ("m", 512)]
    assert list(scheduler.loaded) == ["m"] and [m.key for m in await scheduler.running()] == [("m", 512)]
    reloaded.release()
    await scheduler.close()


async def test_requests_with_the_same_load_options_share_and_others_queue_for_reloads() -> None:
    loader = FakeLoader()
    scheduler = Scheduler(loader=loader, identity=by_model, max_loaded=3)
    leases: list[Any] = []
    live: list[int] = []

    async def use(num_ctx: int) -> None:
        lease = await scheduler.acquire(("m", num_ctx), name="m", keep_alive=60)
        live.append(sum(not r.closed for r in loader.runners.values()))  # runners of "m" open right now
        leases.append(lease)
        await anyio.wait_all_tasks_blocked()
        lease.release()

    async with anyio.create_task_group() as group:
        for num_ctx in (256, 256, 512, 512, 256):
            group.start_soon(use, num_ctx)
    assert max(live) == 1, "never two runners of one model at once"
    assert len(leases) == 5 and len(scheduler.loaded) == 1
    assert loader.loads.count(("m", 256)) >= 1 and loader.loads.count(("m", 512)) == 1
    await scheduler.close()


async def test_a_load_in_flight_with_other_options_is_waited_for_then_reloaded() -> None:
    gate = threading.Event()
    loader = FakeLoader(gates={("m", 256): gate})
    scheduler = Scheduler(loader=loader, identity=by_model)
    got: list[Any] = []
    async with anyio.create_task_group() as group:
        group.start_soon(_append, got, scheduler.acquire(("m", 256), name="m", keep_alive=60))
        await anyio.to_thread.run_sync(loader.started.wait)
        group.start_soon(_append, got, scheduler.acquire(("m", 512), name="m", keep_alive=60))
        await anyio.wait_all_tasks_blocked()
        gate.set()
        with anyio.fail_after(5):
            while not got:
                await anyio.sleep(0.01)
        got[0].release()
    assert [lease.runner.key for lease in got] == [("m", 256), ("m", 512)]
    assert loader.runners[("m", 256)].closed and list(scheduler.loaded) == ["m"]
    got[1].release()
    await scheduler.close()


async def test_a_reload_is_planned_without_the_old_runner_and_other_models_stay() -> None:
    loader = FakeLoader(sizes={("m", 256): 400, ("m", 512): 600, ("n", 256): 300})
    scheduler: Scheduler[tuple[str, int], FakeRunner] = Scheduler(
        loader=loader, identity=by_model, sizer=loader.size, memory_budget=lambda: 1_000 - used()
    )

    def used() -> int:
        return sum(m.size for m in scheduler.loaded.values())

    for key in (("m", 256), ("n", 256), ("m", 512)):
        (await scheduler.acquire(key, name=key[0], keep_alive=60)).release()
    assert not loader.runners[("n", 256)].closed, "the reload freed the room it needed by unloading the old runner"
    assert sorted(m.key for m in scheduler.loaded.values()) == [("m", 512), ("n", 256)]
    await scheduler.close()


async def _append(into: list[Any], awaitable: Any) -> None:
    into.append(await awaitable)
