"""Token logprobs on the real SmolLM2 model: through the Engine, the sync Client, and the HTTP shim's
Ollama and OpenAI APIs (driven by the official `ollama` and `openai` clients)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from servers import localllm_shim

import localllm
from localllm import Engine
from localllm.http import ServerThread
from localllm.types import Logprob


@pytest.fixture
def anyio_backend() -> str:
    # What this module checks happens in the runner's thread, the same under every event loop; the model
    # runs are what cost. The loops themselves are tested end to end in test_engine.py and, on the scripted
    # model, in test_pipeline_fast.py.
    return "asyncio"


# Greedy on the raw logits (no repeat penalty), so the sampled token is always the most likely one.
GREEDY = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 12}
PROMPT = "Name three colors."
CHAT = [{"role": "user", "content": PROMPT}]
MODEL = "smollm2-greedy"  # in the shim's store


def check_greedy(logprobs: Sequence[Any], top: int) -> None:
    """Each token is the most likely at its position, logprobs are <= 0, and the alternatives are sorted."""
    assert logprobs
    for entry in logprobs:
        assert entry.logprob <= 0 and math.isfinite(entry.logprob)
        alternatives = entry.top_logprobs
        assert alternatives is not None and len(alternatives) == top
        assert (alternatives[0].token, alternatives[0].logprob) == (entry.token, entry.logprob)
        values = [alternative.logprob for alternative in alternatives]
        assert values == sorted(values, reverse=True) and values[-1] <= 0


def text_of(logprobs: Sequence[Any]) -> str:
    return "".join(entry.token for entry in logprobs)


def check_bytes(logprobs: Sequence[Any]) -> None:
    for entry in logprobs:
        assert bytes(entry.bytes) == entry.token.encode()  # whole characters here, so the text's own bytes
        for alternative in entry.top_logprobs or ():
            assert bytes(alternative.bytes).decode("utf-8", errors="replace") == alternative.token


# -- the Engine ---------------------------------------------------------------------


async def test_generate_logprobs_stream_and_whole(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    async with Engine(home, num_parallel=1) as engine:
        chunks = [c async for c in engine.generate(model, PROMPT, options=GREEDY, logprobs=True, top_logprobs=5)]
        whole = await engine.generate(model, PROMPT, options=GREEDY, logprobs=True, top_logprobs=5)
        plain = await engine.generate(model, PROMPT, options=GREEDY)
        ignored = await engine.generate(model, PROMPT, options=GREEDY, top_logprobs=5)  # without logprobs, as in Ollama

    streamed: list[Logprob] = []
    for chunk in chunks[:-1]:
        assert chunk.logprobs is not None and text_of(chunk.logprobs) == chunk.response  # each chunk its own tokens
        streamed.extend(chunk.logprobs)
    assert chunks[-1].done and chunks[-1].logprobs is None
    assert whole.logprobs is not None
    check_greedy(whole.logprobs, 5)
    check_bytes(whole.logprobs)
    assert text_of(whole.logprobs) == whole.response == plain.response
    assert len(whole.logprobs) == whole.eval_count
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole.logprobs]
    assert plain.logprobs is None and ignored.logprobs is None


async def test_chat_logprobs(smollm2_path: Path, home: Path) -> None:
    async with Engine(home, num_parallel=1) as engine:
        reply = await engine.chat(str(smollm2_path), CHAT, options=GREEDY, logprobs=True)
        chunks = [c async for c in engine.chat(str(smollm2_path), CHAT, options=GREEDY, logprobs=True, top_logprobs=2)]
    assert reply.logprobs is not None and text_of(reply.logprobs) == reply.message.content
    assert all(entry.top_logprobs is None for entry in reply.logprobs)  # top_logprobs 0: the sampled token only
    assert reply.model_dump()["logprobs"][0].keys() == {"token", "logprob", "bytes", "top_logprobs"}
    streamed = [entry for chunk in chunks for entry in chunk.logprobs or ()]
    check_greedy(streamed, 2)
    assert text_of(streamed) == "".join(chunk.message.content for chunk in chunks) == reply.message.content


async def test_a_stop_sequence_drops_the_logprobs_of_its_tokens(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    async with Engine(home, num_parallel=1) as engine:
        free = await engine.generate(model, PROMPT, options=GREEDY, logprobs=True)
        assert free.logprobs is not None
        # A stop sequence that is a later token's whole text, found nowhere before it.
        starts = [len(text_of(free.logprobs[:i])) for i in range(len(free.logprobs))]
        index = next(
            i
            for i, entry in enumerate(free.logprobs)
            if i >= 2 and entry.token.strip() and free.response.find(entry.token) == starts[i]
        )
        stop = free.logprobs[index].token
        stopped = await engine.generate(model, PROMPT, options={**GREEDY, "stop": [stop]}, logprobs=True)
    assert stopped.done_reason == "stop" and stopped.response == text_of(free.logprobs[:index])
    assert stopped.logprobs is not None and text_of(stopped.logprobs) == stopped.response


@pytest.mark.parametrize("top_logprobs", [21, -1, 2.5, "3", True])
async def test_top_logprobs_out_of_range(home: Path, top_logprobs: Any) -> None:
    async with Engine(home) as engine:
        with pytest.raises(localllm.InvalidRequest, match="top_logprobs"):
            engine.generate("smollm2", "hi", logprobs=True, top_logprobs=top_logprobs)
        with pytest.raises(localllm.InvalidRequest, match="top_logprobs"):
            engine.chat("smollm2", CHAT, top_logprobs=top_logprobs)


def test_the_sync_client(smollm2_path: Path, home: Path) -> None:
    with localllm.Client(home, num_parallel=1) as client:
        reply = client.generate(str(smollm2_path), PROMPT, options=GREEDY, logprobs=True, top_logprobs=3)
        assert reply.logprobs is not None
        check_greedy(reply.logprobs, 3)
        chunks = list(client.chat(str(smollm2_path), CHAT, options=GREEDY, logprobs=True, stream=True))
        assert text_of([e for c in chunks for e in c.logprobs or ()]) == "".join(c.message.content for c in chunks)
        with pytest.raises(localllm.InvalidRequest, match="top_logprobs"):
            client.chat(str(smollm2_path), CHAT, logprobs=True, top_logprobs=100)


# -- the HTTP shim ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[ServerThread]:
    with localllm_shim(tmp_path_factory.mktemp("home"), smollm2_path) as running:
        # OpenAI's API cannot set repeat_penalty: this model's parameters make temperature 0 greedy on the raw logits.
        with ollama.Client(host=running.url) as setup:
            setup.create(MODEL, from_="smollm2", parameters={"repeat_penalty": 1.0})
        yield running


@pytest.fixture(scope="module")
def openai_client(server: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def ollama_client(server: ServerThread) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url, timeout=120) as client:
        yield client


def test_ollama_generate_and_chat(ollama_client: ollama.Client) -> None:
    reply = ollama_client.generate(MODEL, PROMPT, options=GREEDY, logprobs=True, top_logprobs=3)
    assert reply.logprobs is not None and text_of(reply.logprobs) == reply.response
    check_greedy(reply.logprobs, 3)

    chunks = list(ollama_client.chat(MODEL, CHAT, options=GREEDY, logprobs=True, stream=True))
    streamed = [entry for chunk in chunks for entry in chunk.logprobs or ()]
    assert streamed and all(entry.top_logprobs is None for entry in streamed)
    assert text_of(streamed) == "".join(chunk.message.content or "" for chunk in chunks)

    with pytest.raises(ollama.ResponseError) as refused:
        ollama_client.chat(MODEL, CHAT, logprobs=True, top_logprobs=21)
    assert refused.value.status_code == 400 and "top_logprobs" in refused.value.error


def test_ollama_json_carries_bytes(server: ServerThread) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "options": GREEDY, "stream": False, "logprobs": True}
    reply = httpx.post(f"{server.url}/api/generate", json=body, timeout=120).json()
    first = reply["logprobs"][0]
    assert first.keys() == {"token", "logprob", "bytes"}  # no top_logprobs asked for: none written, as Ollama
    assert bytes(first["bytes"]).decode() == first["token"]


def test_openai_chat_completions(openai_client: openai.OpenAI) -> None:
    settings: dict[str, Any] = {"model": MODEL, "messages": CHAT, "temperature": 0, "max_tokens": 12}
    reply = openai_client.chat.completions.create(**settings, logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    check_greedy(choice.logprobs.content, 3)
    check_bytes(choice.logprobs.content)
    assert text_of(choice.logprobs.content) == choice.message.content

    parts = list(openai_client.chat.completions.create(**settings, logprobs=True, top_logprobs=3, stream=True))
    scored = [part.choices[0].logprobs for part in parts if part.choices and part.choices[0].logprobs]
    streamed = [entry for logprobs in scored for entry in logprobs.content or ()]
    content = "".join(part.choices[0].delta.content or "" for part in parts if part.choices)
    assert text_of(streamed) == content == choice.message.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in choice.logprobs.content]

    assert openai_client.chat.completions.create(**settings).choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        openai_client.chat.completions.create(**settings, logprobs=True, top_logprobs=21)


def test_openai_completions(openai_client: openai.OpenAI) -> None:
    settings: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 12}
    reply = openai_client.completions.create(**settings, logprobs=2)
    choice = reply.choices[0]
    scored = choice.logprobs
    assert scored is not None and scored.tokens and scored.token_logprobs and scored.top_logprobs
    assert "".join(scored.tokens) == choice.text
    assert scored.text_offset == [len("".join(scored.tokens[:i])) for i in range(len(scored.tokens))]
    for token, logprob, alternatives in zip(scored.tokens, scored.token_logprobs, scored.top_logprobs, strict=True):
        assert logprob <= 0 and alternatives[token] == logprob  # greedy: the sampled token is the most likely
        assert len(alternatives) == 2 and max(alternatives.values()) == logprob

    parts = list(openai_client.completions.create(**settings, logprobs=0, stream=True))
    tokens = [t for part in parts if part.choices[0].logprobs for t in part.choices[0].logprobs.tokens or ()]
    offsets = [o for part in parts if part.choices[0].logprobs for o in part.choices[0].logprobs.text_offset or ()]
    assert "".join(tokens) == "".join(part.choices[0].text for part in parts) == choice.text
    assert offsets == scored.text_offset  # counted across chunks, from the start of the completion

    assert openai_client.completions.create(**settings).choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        openai_client.completions.create(**settings, logprobs=21)
