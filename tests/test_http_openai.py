"""The OpenAI-compatible API over a real engine, driven by the official `openai` Python client."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from servers import localllm_shim

from localllm.http import ServerThread

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[ServerThread]:
    with localllm_shim(tmp_path_factory.mktemp("home"), smollm2_path) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def minilm(server: ServerThread, minilm_gguf: Path) -> str:
    path = minilm_gguf
    with ollama.Client(host=server.url) as setup:
        digest = setup.create_blob(path)
        setup.create("minilm", files={"minilm.gguf": digest}, parameters={"num_thread": 1})
    return "minilm"


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}],
        temperature=0,
        max_tokens=10,
        seed=1,
    )
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == "smollm2"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_completion_streamed_with_usage(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Count to five."}]
    whole = client.chat.completions.create(
        model="smollm2",
        messages=messages,
        temperature=0,
        max_completion_tokens=8,
    )
    stream = client.chat.completions.create(
        model="smollm2",
        messages=messages,
        temperature=0,
        max_completion_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8


def test_stop_and_json_mode(server: ServerThread, client: openai.OpenAI) -> None:
    # Greedy without a repeat penalty (the default, as Ollama's) this model nests its object past max_tokens; the
    # OpenAI API cannot ask for a penalty, a model's parameters can.
    with ollama.Client(host=server.url) as setup:
        setup.create("smollm2-penalized", from_="smollm2", parameters={"repeat_penalty": 1.1})
    reply = client.chat.completions.create(
        model="smollm2-penalized",
        messages=[{"role": "user", "content": "Describe a cat as JSON with a 'name' field."}],
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)

    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    reply = client.chat.completions.create(
        model="smollm2-penalized",
        messages=[{"role": "user", "content": "How old is a young cat? Answer as JSON."}],
        temperature=0,
        max_tokens=30,
        response_format={"type": "json_schema", "json_schema": {"name": "age", "schema": schema}},
    )
    assert isinstance(json.loads(reply.choices[0].message.content or "")["age"], int)

    free = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "List three fruits."}], temperature=0, max_tokens=30
    )
    text = free.choices[0].message.content or ""
    stop = text.split()[1]
    stopped = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "List three fruits."}],
        temperature=0,
        max_tokens=30,
        stop=[stop],
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in (stopped.choices[0].message.content or "")


def test_tool_calls(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=64,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert calls and calls[0].type == "function" and calls[0].id
    assert calls[0].function.name == "get_weather"
    assert isinstance(json.loads(calls[0].function.arguments), dict)

    # Streamed, the call comes as a delta and the stream finishes with "tool_calls".
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=TOOLS,
            tool_choice="required",
            temperature=0,
            max_tokens=64,
            stream=True,
        )
    )
    streamed = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])]
    assert streamed and streamed[0].function is not None and streamed[0].function.name == "get_weather"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]

    # The answer to a call goes back as a tool message with its id.
    call = calls[0]
    follow_up = client.chat.completions.create(
        model="smollm2",
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": call.function.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"},
        ],
        tools=TOOLS,
        temperature=0,
        max_tokens=20,
    )
    assert follow_up.choices[0].message.role == "assistant"


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=6)
    assert reply.object == "text_completion"
    assert reply.choices[0].text and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens <= 6

    chunks = list(
        client.completions.create(
            model="smollm2",
            prompt="The capital of France is",
            temperature=0,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reply.choices[0].text
    assert chunks[-1].usage is not None


def test_embeddings(client: openai.OpenAI, minilm: str) -> None:
    # The client asks for base64 and decodes it; both encodings give the same vectors.
    packed = client.embeddings.create(model=minilm, input=["The cat sits on the mat.", "Hello"])
    assert len(packed.data) == 2 and len(packed.data[0].embedding) == 384
    plain = client.embeddings.create(model=minilm, input="The cat sits on the mat.", encoding_format="float")
    assert plain.data[0].embedding == pytest.approx(packed.data[0].embedding, abs=1e-4)
    assert plain.usage.prompt_tokens > 0
    shorter = client.embeddings.create(model=minilm, input="The cat sits on the mat.", dimensions=64)
    assert len(shorter.data[0].embedding) == 64


def test_embeddings_base64_is_little_endian_float32(server: ServerThread, minilm: str) -> None:
    body = {"model": minilm, "input": "hello", "encoding_format": "base64"}
    answer = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60).json()
    raw = base64.b64decode(answer["data"][0]["embedding"])
    values = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(values) == 384 and abs(sum(v * v for v in values) - 1) < 1e-3


def test_models(client: openai.OpenAI) -> None:
    ids = {m.id: m for m in client.models.list()}
    assert "smollm2:latest" in ids
    assert ids["smollm2:latest"].owned_by == "library" and ids["smollm2:latest"].created > 0
    one = client.models.retrieve("smollm2:latest")
    assert one.id == "smollm2:latest" and one.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_errors(client: openai.OpenAI, server: ServerThread) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body is not None
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "hi"}],
            temperature="hot",
        )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=[])
    with pytest.raises(openai.NotFoundError):
        list(client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], stream=True))
    answer = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", timeout=30)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
