"""The scheduler on the real models: two models at once, eviction, keep_alive, reloads, queue limits, stress."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import anyio
import pytest

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
        contexts = sorted(p.context_length for p in (await engine.ps()).models)
        assert contexts[-1] == 2048


async def test_queue_full_while_the_first_requests_complete(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    results: list[localllm.GenerateResponse] = []
    async with Engine(home, num_parallel=1, max_queue=2) as engine:
        await engine.generate(model, "")  # loaded, so the queue is all that is measured

        async def run(prompt: str) -> None:
            results.append(await engine.generate(model, prompt, options={"temperature": 0, "num_predict": 24}))

        async with anyio.create_task_group() as group:
            group.start_soon(run, "One")
            await anyio.sleep(0.1)  # the first holds the only slot
            group.start_soon(run, "Two")
            group.start_soon(run, "Three")
            await anyio.sleep(0.1)  # two requests now wait
            with pytest.raises(localllm.QueueFull):
                await engine.generate(model, "Four", options=SHORT)
    assert len(results) == 3 and all(r.done for r in results)


async def test_cancelling_queued_and_running_requests(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    async with Engine(home, num_parallel=1) as engine:
        await engine.generate(model, "")
        runner = next(iter(engine.scheduler.loaded.values())).runner

        async def long_story() -> None:
            await engine.generate(model, "Tell a long story.", options={"num_predict": 400})

        async with anyio.create_task_group() as group:
            group.start_soon(long_story)
            await anyio.sleep(0.1)
            with anyio.move_on_after(0.2):  # queued behind the running one, then cancelled
                await engine.generate(model, "Queued", options=SHORT)
            assert runner.pending_count == 0, "a cancelled waiting request leaves the queue"
            group.cancel_scope.cancel()  # cancels the running one
        await anyio.sleep(0.1)
        assert runner.active_count == 0
        reply = await engine.generate(model, "Hi", options=SHORT)
        assert reply.done


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
