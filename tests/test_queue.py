"""The queue bound on the real model: every accepted request counts until it ends, a burst beyond
`max_queue` is refused at once (503 at the shim, as Ollama's "server busy"), and a request that is
cancelled or dropped gives its place back."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import httpx
import pytest

import localllm
from localllm import Engine
from localllm.http import ServerThread

SHORT = {"temperature": 0, "num_predict": 4}
LONG = {"temperature": 0, "num_predict": 2000}


async def test_a_burst_beyond_max_queue_is_refused_at_once(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    outcomes = {"done": 0, "refused": 0}
    async with Engine(home, num_parallel=1, max_queue=2) as engine:

        async def one(i: int) -> None:
            try:
                reply = await engine.generate(model, f"Count to {i}.", options=SHORT)
            except localllm.QueueFull as exc:
                assert "server busy" in str(exc) and "max_queue=2" in str(exc)
                outcomes["refused"] += 1
            else:
                assert reply.done
                outcomes["done"] += 1

        async with anyio.create_task_group() as group:
            for i in range(5):  # max_queue + 3, all accepted or refused before any of them can finish
                group.start_soon(one, i)
        assert outcomes == {"done": 2, "refused": 3}
        assert engine.scheduler.in_flight == 0
        # The places are free again once those requests ended.
        assert (await engine.generate(model, "Hi", options=SHORT)).done


async def test_embeddings_count_under_the_bound_too(smollm2_path: Path, minilm_gguf: Path, home: Path) -> None:
    async with Engine(home, num_parallel=1, max_queue=1) as engine:
        stream = await engine.generate(str(smollm2_path), "Tell a long story.", options=LONG, stream=True)
        await stream.__anext__()  # running: it holds the only place
        with pytest.raises(localllm.QueueFull):
            await engine.embed(str(minilm_gguf), "a sentence")
        await stream.aclose()
        assert len((await engine.embed(str(minilm_gguf), "a sentence")).embeddings) == 1


async def test_a_dropped_stream_gives_its_place_back(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    async with Engine(home, num_parallel=1, max_queue=1) as engine:
        stream = await engine.generate(model, "Tell a long story.", options=LONG, stream=True)
        await stream.__anext__()
        with pytest.raises(localllm.QueueFull):
            await engine.chat(model, [{"role": "user", "content": "Hi"}], options=SHORT)
        await stream.aclose()  # the client stops reading
        assert engine.scheduler.in_flight == 0
        assert (await engine.chat(model, [{"role": "user", "content": "Hi"}], options=SHORT)).done


async def test_a_cancelled_waiting_request_gives_its_place_back(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    async with Engine(home, num_parallel=1, max_queue=2) as engine:
        running = await engine.generate(model, "Tell a long story.", options=LONG, stream=True)
        await running.__anext__()  # holds the only slot

        async def queued() -> None:
            await engine.generate(model, "Queued behind it.", options=SHORT)

        async with anyio.create_task_group() as group:
            group.start_soon(queued)
            with anyio.fail_after(30):
                while engine.scheduler.in_flight < 2:  # the second request is accepted and waits for the slot
                    await anyio.sleep(0.01)
            with pytest.raises(localllm.QueueFull):
                await engine.generate(model, "A third.", options=SHORT)
            group.cancel_scope.cancel()
        assert engine.scheduler.in_flight == 1, "the cancelled request left; the running one still counts"

        async with anyio.create_task_group() as group:
            replies: list[localllm.GenerateResponse] = []

            async def accepted() -> None:
                replies.append(await engine.generate(model, "Accepted now.", options=SHORT))

            group.start_soon(accepted)
            with anyio.fail_after(30):
                while engine.scheduler.in_flight < 2:
                    await anyio.sleep(0.01)
            await running.aclose()  # frees the slot the accepted request waits for
        assert len(replies) == 1 and replies[0].done


def test_the_shim_answers_503_server_busy(smollm2_path: Path, home: Path) -> None:
    async def create() -> None:
        async with Engine(home) as engine:
            await engine.create("smollm2", from_=smollm2_path)

    anyio.run(create)
    with (
        ServerThread(lambda: Engine(home, num_parallel=1, max_queue=1)) as server,
        httpx.Client(base_url=server.url, timeout=120) as http,
    ):
        body = {"model": "smollm2", "prompt": "Tell a long story.", "options": LONG}
        with http.stream("POST", "/api/generate", json=body) as running:
            assert running.status_code == 200
            lines = running.iter_lines()  # kept: a dropped line iterator closes the connection
            next(lines)  # the first chunk: the request is running and holds the only place
            busy = http.post("/api/generate", json={**body, "options": SHORT, "stream": False})
            assert busy.status_code == 503
            assert busy.json()["error"].startswith("server busy, please try again.  maximum pending requests exceeded")
            chat = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}
            assert http.post("/v1/chat/completions", json=chat).status_code == 503
        _wait_until_idle(server)  # the server notices the client left, and the request gives its place back
        reply = http.post("/api/generate", json={**body, "options": SHORT, "stream": False})
        assert reply.status_code == 200 and reply.json()["done"]


def _wait_until_idle(server: ServerThread) -> None:
    deadline = time.monotonic() + 30
    while server.engine.scheduler.in_flight:
        assert time.monotonic() < deadline, "a request the client left still holds its place"
        time.sleep(0.01)
