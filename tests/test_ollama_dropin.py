"""localllm as a drop-in for the ollama client: one program, run on ollama's client and on localllm's.

The async script runs once on `ollama.AsyncClient` talking to localllm's HTTP shim and once on a
`localllm.Engine` in its place; the sync script runs on `ollama.Client` over the shim and on
`localllm.Client`. Only the constructor differs.
"""

from __future__ import annotations

import datetime as dt
import inspect
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import ollama
import pytest
from servers import OCIRegistry, localllm_shim, tiny_gguf

import localllm

GREEDY = ollama.Options(temperature=0, num_predict=8, repeat_penalty=1.0)  # only what is set may reach the engine
QUESTION = [ollama.Message(role="user", content="What is the capital of France?")]
WEATHER = ollama.Tool(
    type="function",
    function=ollama.Tool.Function(
        name="get_weather",
        description="The weather in a city",
        parameters=ollama.Tool.Function.Parameters(
            type="object",
            properties={"city": ollama.Tool.Function.Parameters.Property(type="string", description="The city")},
            required=["city"],
        ),
    ),
)
SMOLLM2_PARAMETERS = {"num_ctx": 2048, "num_thread": 1, "stop": ["<|im_end|>"]}


# --------------------------------------------------------------------------- the scripts


async def async_script(client: Any, smollm2: Path, minilm: Path) -> None:
    """A program written for `ollama.AsyncClient`; `client` is one, or a `localllm.Engine`."""
    digest = await client.create_blob(smollm2)
    assert digest.startswith("sha256:")
    progress = [p async for p in await client.create("smollm2", files={smollm2.name: digest}, stream=True)]
    assert progress[-1].status == "success"
    created = await client.create(
        "minilm", files={"minilm.gguf": await client.create_blob(minilm)}, parameters={"num_thread": 1}
    )
    assert created.status == "success"
    # Parameters as a Modelfile gives them, on top of the stored model.
    await client.create("smollm2", from_="smollm2", parameters=SMOLLM2_PARAMETERS)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "unknown option" for the fields ollama.Options leaves unset
        reply = await client.chat("smollm2", messages=QUESTION, options=GREEDY)
    assert reply.done and reply.message.role == "assistant" and reply.message.content
    assert reply["message"]["content"] == reply.message.content and "message" in reply
    assert dict(reply)["model"] == reply.model == "smollm2" and reply.model_dump()["message"]["role"] == "assistant"
    chunks = [chunk async for chunk in await client.chat("smollm2", messages=QUESTION, options=GREEDY, stream=True)]
    assert "".join(chunk.message.content for chunk in chunks) == reply.message.content
    assert chunks[-1].done and chunks[-1].eval_count == reply.eval_count

    with_tools = await client.chat(
        "smollm2", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER], options=GREEDY
    )
    assert with_tools.done

    generated = await client.generate("smollm2", "The capital of France is", options={"num_predict": 6})
    assert generated.done and generated.response and 0 < generated.eval_count <= 6
    streamed = [chunk.response async for chunk in await client.generate("smollm2", "Hi", options=GREEDY, stream=True)]
    assert streamed

    embedded = await client.embed("minilm", ["The cat sits.", "A dog runs."])
    assert [len(vector) for vector in embedded.embeddings] == [384, 384]

    listed = {m.model: m for m in (await client.list()).models}
    assert {"smollm2:latest", "minilm:latest"} <= set(listed)
    entry = listed["smollm2:latest"]
    assert isinstance(entry.modified_at, dt.datetime) and entry.size > 90_000_000
    assert entry.details.family == "llama" and entry.details.quantization_level == "Q4_1"

    shown = await client.show("smollm2")
    assert "completion" in shown.capabilities and shown.modelinfo["general.architecture"] == "llama"
    assert isinstance(shown.modified_at, dt.datetime) and "num_ctx" in shown.parameters and shown.template
    assert shown.details.family == "llama" and "FROM" in shown.modelfile

    running = {m.model: m for m in (await client.ps()).models}
    assert {"smollm2:latest", "minilm:latest"} <= set(running)
    assert isinstance(running["smollm2:latest"].expires_at, dt.datetime)
    assert running["smollm2:latest"].context_length == 2048

    assert (await client.copy("smollm2", "copied")).status == "success"
    assert "copied:latest" in {m.model for m in (await client.list()).models}
    assert (await client.delete("copied")).status == "success"
    assert "copied:latest" not in {m.model for m in (await client.list()).models}

    with pytest.raises((ollama.ResponseError, localllm.NotFoundError)) as missing:
        await client.chat("no-such-model", messages=QUESTION)
    assert missing.value.status_code == 404 and "not found" in missing.value.error
    with pytest.raises((ollama.ResponseError, localllm.NotFoundError)) as missing:
        await client.show("no-such-model")
    assert missing.value.status_code == 404


def sync_script(client: Any, smollm2: Path, minilm: Path) -> None:
    """The same program written for `ollama.Client`; `client` is one, or a `localllm.Client`."""
    digest = client.create_blob(smollm2)
    progress = list(client.create("smollm2", files={smollm2.name: digest}, stream=True))
    assert progress[-1].status == "success"
    created = client.create("minilm", files={"minilm.gguf": client.create_blob(minilm)}, parameters={"num_thread": 1})
    assert created.status == "success"
    client.create("smollm2", from_="smollm2", parameters=SMOLLM2_PARAMETERS)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        reply = client.chat("smollm2", messages=QUESTION, options=GREEDY)
    assert reply.done and reply.message.role == "assistant" and reply.message.content
    chunks = list(client.chat("smollm2", messages=QUESTION, options=GREEDY, stream=True))
    assert "".join(chunk.message.content for chunk in chunks) == reply.message.content
    assert chunks[-1].done and chunks[-1].eval_count == reply.eval_count
    for _chunk in client.chat("smollm2", messages=QUESTION, options=GREEDY, stream=True):
        break  # leaving early stops the request

    assert client.chat("smollm2", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER]).done
    generated = client.generate("smollm2", "The capital of France is", options={"num_predict": 6})
    assert generated.done and generated.response and 0 < generated.eval_count <= 6
    assert [len(v) for v in client.embed("minilm", ["The cat sits.", "A dog runs."]).embeddings] == [384, 384]

    listed = {m.model: m for m in client.list().models}
    assert {"smollm2:latest", "minilm:latest"} <= set(listed)
    assert isinstance(listed["smollm2:latest"].modified_at, dt.datetime)
    shown = client.show("smollm2")
    assert "completion" in shown.capabilities and shown.modelinfo["general.architecture"] == "llama"
    running = {m.model: m for m in client.ps().models}
    assert isinstance(running["smollm2:latest"].expires_at, dt.datetime)

    assert client.copy("smollm2", "copied").status == "success"
    assert client.delete("copied").status == "success"
    assert "copied:latest" not in {m.model for m in client.list().models}

    with pytest.raises((ollama.ResponseError, localllm.NotFoundError)) as missing:
        client.chat("no-such-model", messages=QUESTION)
    assert missing.value.status_code == 404


# --------------------------------------------------------------------------- the runs


async def test_async_script_on_ollama_async_client_over_the_shim(
    home: Path, smollm2_path: Path, minilm_gguf: Path
) -> None:
    with localllm_shim(home) as server:
        async with ollama.AsyncClient(host=server.url) as client:
            await async_script(client, smollm2_path, minilm_gguf)


async def test_async_script_on_an_engine(home: Path, smollm2_path: Path, minilm_gguf: Path) -> None:
    async with localllm.Engine(home, num_parallel=2) as client:
        await async_script(client, smollm2_path, minilm_gguf)


def test_sync_script_on_ollama_client_over_the_shim(home: Path, smollm2_path: Path, minilm_gguf: Path) -> None:
    with localllm_shim(home) as server, ollama.Client(host=server.url) as client:
        sync_script(client, smollm2_path, minilm_gguf)


def test_sync_script_on_a_client(home: Path, smollm2_path: Path, minilm_gguf: Path) -> None:
    with localllm.Client(home, num_parallel=2) as client:
        sync_script(client, smollm2_path, minilm_gguf)


# --------------------------------------------------------------------------- shapes, pull and push, the sync client


def test_responses_read_like_the_ollama_clients() -> None:
    message = localllm.Message.from_any(ollama.Message(role="user", content="hi", images=None))
    assert message == localllm.Message(role="user", content="hi")
    status = localllm.ProgressResponse(status="pulling", total=10, completed=5)
    assert status["total"] == 10 and status.get("digest") is None and status.get("nothing", 1) == 1
    assert "total" in status and "digest" not in status and "nothing" not in status
    assert dict(status) == {"status": "pulling", "completed": 5, "total": 10, "digest": None}
    assert status.model_dump(exclude_none=True) == {"status": "pulling", "completed": 5, "total": 10}
    with pytest.raises(KeyError):
        status["nothing"]
    assert localllm.InvalidOptions("bad").status_code == 400 and localllm.QueueFull("busy").status_code == 503
    assert localllm.ModelNotFound(model="m").error == "model 'm' not found"
    assert localllm.RunnerError("crashed").status_code == 500


async def test_pull_streams_progress_or_returns_the_final_status(home: Path) -> None:
    with OCIRegistry() as registry:
        registry.add_model("library/tiny", "latest", tiny_gguf(seed=3, rows=400))
        name = f"{registry.host}/library/tiny:latest"
        async with localllm.Engine(home) as engine:
            reported: list[dict[str, Any]] = []
            events = [p async for p in await engine.pull(name, insecure=True, stream=True, progress=reported.append)]
            assert events[0].status == "pulling manifest" and events[-1].status == "success"
            layers = [event for event in events if event.digest]
            assert layers and layers[-1].completed == layers[-1].total
            assert reported == [event.model_dump(exclude_none=True) for event in events]  # the callback still works
            assert name in {m.model for m in (await engine.list()).models}

            assert await engine.pull(name, insecure=True) == localllm.ProgressResponse(status="success")
            with pytest.raises(localllm.LocalLLMError) as missing:
                await engine.pull(f"{registry.host}/library/missing:latest", insecure=True)
            assert missing.value.status_code == 404


async def test_push_is_refused(home: Path) -> None:
    async with localllm.Engine(home) as engine:
        with pytest.raises(localllm.InputError, match="push"):
            await engine.push("smollm2")


async def test_a_client_works_inside_a_running_event_loop(home: Path) -> None:
    """As in a notebook cell: the client's loop runs in its own thread, so the caller's loop is no obstacle."""
    with localllm.Client(home) as client:
        assert client.list().models == [] and client.ps().models == []
        with pytest.raises(localllm.ModelNotFound) as missing:
            client.show("nothing")
        assert missing.value.status_code == 404


def test_a_client_works_from_other_threads(home: Path) -> None:
    results: list[int] = []
    with localllm.Client(home) as client:
        threads = [threading.Thread(target=lambda: results.append(len(client.list().models))) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results == [0, 0, 0]
    with pytest.raises(localllm.EngineClosed):
        client.list()


def test_a_client_left_open_is_closed_at_exit(home: Path) -> None:
    script = f"import localllm; client = localllm.Client({str(home)!r}); print(len(client.list().models))"
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0 and finished.stdout == "0\n", finished.stderr


def test_module_functions_use_a_default_client(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALLLM_HOME", str(home))
    monkeypatch.setattr(localllm.client, "_default", None)
    try:
        assert localllm.list().models == [] and localllm.ps().models == []
        assert localllm.client.default_client() is localllm.client.default_client()
        with pytest.raises(localllm.ModelNotFound):
            localllm.chat("nothing", [{"role": "user", "content": "hi"}])
    finally:
        localllm.client.default_client().close()


def test_the_sync_client_takes_every_engine_setting() -> None:
    engine = inspect.signature(localllm.Engine.__init__).parameters
    client = inspect.signature(localllm.Client.__init__).parameters
    assert list(client) == list(engine)
