"""The scheduler on the real models: two models at once, eviction, keep_alive, one runner per model and its
reloads, stress. (The queue bound: test_queue.py.)"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anyio

import localllm
from localllm import Engine

SHORT = {"temperature": 0, "num_predict": 6}


def runner_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("localllm-runner")]


async def test_two_models_answer_concurrently_and_ps_matches(smollm2_path: Path, gemma3_path: Path, home: Path) -> None:
    replies: dict[str, localllm.ChatResponse] = {}
    async with Engine(home, keep_alive="10m") as engine:

        async def ask(model: Path) -> None:
            replies[model.name] = await engine.chat(
                str(model), [{"role": "user", "content": "Name a colour."}], options=SHORT
            )

        async with anyio.create_task_group() as group:
            group.start_soon(ask, smollm2_path)
            group.start_soon(ask, gemma3_path)
        running = (await engine.ps()).models
        assert {p.name for p in running} == {str(smollm2_path), str(gemma3_path)}
        for process in running:
            assert process.size > 0 and process.size_vram == 0
            assert process.context_length == 4096
            assert process.expires_at is not None and process.active_requests == 0
    # A base model without a chat template still answers (plain prompt fallback).
    assert all(r.message.content for r in replies.values()), replies
    assert not runner_threads()


async def test_max_loaded_one_evicts_the_idle_model(smollm2_path: Path, gemma3_path: Path, home: Path) -> None:
    async with Engine(home, max_loaded_models=1) as engine:
        await engine.generate(str(smollm2_path), "Hi", options=SHORT)
        assert [p.name for p in (await engine.ps()).models] == [str(smollm2_path)]
        await engine.generate(str(gemma3_path), "Hi", options=SHORT)
        assert [p.name for p in (await engine.ps()).models] == [str(gemma3_path)]
        assert engine.scheduler.load_count == 2


async def test_keep_alive_zero_and_one_second(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    async with Engine(home) as engine:
        await engine.generate(model, "Hi", options=SHORT, keep_alive=0)
        with anyio.fail_after(5):
            while (await engine.ps()).models:
                await anyio.sleep(0.02)

        await engine.generate(model, "Hi", options=SHORT, keep_alive="1s")
        idle_since = time.monotonic()
        assert len((await engine.ps()).models) == 1
        with anyio.fail_after(5):
            while (await engine.ps()).models:
                await anyio.sleep(0.02)
        assert 0.9 <= time.monotonic() - idle_since <= 2.5


async def test_empty_requests_load_and_unload(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    async with Engine(home) as engine:
        loaded = await engine.generate(model, "")
        assert loaded.done_reason == "load" and len((await engine.ps()).models) == 1
        unloaded = await engine.chat(model, [], keep_alive=0)
        assert unloaded.done_reason == "unload"
        assert (await engine.ps()).models == []


async def test_load_options_reload_and_sampling_options_do_not(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    async with Engine(home) as engine:
        await engine.generate(model, "Hi", options={**SHORT, "num_ctx": 1024})
        await engine.generate(model, "Hi", options={**SHORT, "num_ctx": 1024, "temperature": 0.9, "top_k": 5})
        assert engine.scheduler.load_count == 1
        await engine.generate(model, "Hi", options={**SHORT, "num_ctx": 2048})
        assert engine.scheduler.load_count == 2
        assert [p.context_length for p in (await engine.ps()).models] == [2048]


async def test_one_runner_per_model_other_num_ctx_reloads_it(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    async with Engine(home) as engine:
        await engine.generate(model, "Hi", options={**SHORT, "num_ctx": 256})
        await engine.generate(model, "Hi", options={**SHORT, "num_ctx": 512})
        (running,) = (await engine.ps()).models  # the 256 runner made way for the 512 one, as in Ollama
        assert running.name == model and running.context_length == 512


async def test_a_reload_waits_for_the_running_request(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    async with Engine(home, num_parallel=1) as engine:
        first = await engine.generate(
            model, "Tell a long story.", options={"temperature": 0, "num_predict": 2000, "num_ctx": 256}, stream=True
        )
        await first.__anext__()
        replies: list[localllm.GenerateResponse] = []

        async def other_num_ctx() -> None:
            replies.append(await engine.generate(model, "Hi", options={**SHORT, "num_ctx": 512}))

        async with anyio.create_task_group() as group:
            group.start_soon(other_num_ctx)
            more = [(await first.__anext__()).response for _ in range(3)]  # the first goes on meanwhile
            assert all(more) and not replies and engine.scheduler.load_count == 1
            await first.aclose()  # its runner is now idle: unloaded, and the model loaded with num_ctx 512
        assert replies[0].done and engine.scheduler.load_count == 2
        (running,) = (await engine.ps()).models
        assert running.context_length == 512


async def test_cancelling_queued_and_running_requests(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    async with Engine(home, num_parallel=1) as engine:
        await engine.generate(model, "")
        runner = next(iter(engine.scheduler.loaded.values())).runner

        async def queued() -> None:
            await engine.generate(model, "Queued", options=SHORT)

        async with anyio.create_task_group() as group:
            story = await engine.generate(model, "Tell a long story.", options={"num_predict": 400}, stream=True)
            await story.__anext__()  # running: it holds the only slot
            group.start_soon(queued)
            await until(lambda: runner.pending_count == 1)  # queued behind the running one
            group.cancel_scope.cancel()
        await until(lambda: runner.pending_count == 0)  # a cancelled waiting request leaves the queue
        await story.aclose()  # the running one stops
        await until(lambda: runner.active_count == 0)
        reply = await engine.generate(model, "Hi", options=SHORT)
        assert reply.done


async def until(condition: Callable[[], bool]) -> None:
    """Wait for the runner's thread to reach a state (it gets there in milliseconds; the bound is for a hang)."""
    with anyio.fail_after(30):
        while not condition():
            await anyio.sleep(0.01)


async def test_two_hundred_requests_with_random_cancellations(
    smollm2_path: Path, gemma3_path: Path, home: Path
) -> None:
    rng = random.Random(1234)
    models = [str(smollm2_path), str(gemma3_path)]
    outcomes = {"done": 0, "cancelled": 0}
    async with Engine(home, num_parallel=4, max_queue=512) as engine:

        async def one(i: int) -> None:
            model = models[i % 2]
            budget = rng.choice([None, None, None, 0.05, 0.3, 1.0])
            with anyio.move_on_after(budget if budget is not None else 120) as scope:
                reply = await engine.generate(model, f"Say the number {i}.", options={"num_predict": 4, "seed": i})
                assert reply.done
                outcomes["done"] += 1
            if scope.cancelled_caught:
                outcomes["cancelled"] += 1

        with anyio.fail_after(240):  # bounded: a deadlock fails the test instead of hanging it
            async with anyio.create_task_group() as group:
                for i in range(200):
                    group.start_soon(one, i)
        assert outcomes["done"] + outcomes["cancelled"] == 200
        assert outcomes["done"] > 100 and outcomes["cancelled"] > 0
        for loaded in engine.scheduler.loaded.values():
            assert loaded.users == 0
            assert loaded.runner.active_count == 0 and loaded.runner.pending_count == 0
    assert not runner_threads(), "no worker thread outlives the engine"
