"""Anthropic's Messages API over a real engine, driven by the official `anthropic` Python client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest
from servers import localllm_shim

from localllm.http import ServerThread

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
#: The SDK no longer offers sampling parameters; clients that send them get them honoured.
GREEDY = {"temperature": 0}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[ServerThread]:
    with localllm_shim(tmp_path_factory.mktemp("home"), smollm2_path) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_message(client: anthropic.Anthropic) -> None:
    reply = client.messages.create(
        model="smollm2",
        system="Be brief.",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=10,
        extra_body=GREEDY,
        metadata={"user_id": "someone"},
    )
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    assert reply.model == "smollm2"
    assert [block.type for block in reply.content] == ["text"]
    assert reply.content[0].text  # type: ignore[union-attr]
    assert reply.stop_reason in ("end_turn", "max_tokens") and reply.stop_sequence is None
    assert 0 < reply.usage.output_tokens <= 10 and reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0)

    cut = client.messages.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello."}], max_tokens=1, extra_body=GREEDY
    )
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 1
    text = reply.content[0].text  # type: ignore[union-attr]
    stopped = client.messages.create(
        model="smollm2",
        system="Be brief.",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=10,
        stop_sequences=[text[2:4]],
        extra_body=GREEDY,
    )
    assert stopped.content[0].text == text[: text.index(text[2:4])]  # type: ignore[union-attr]


def test_stream_agrees_with_the_whole_message(client: anthropic.Anthropic) -> None:
    request = {
        "model": "smollm2",
        "system": [{"type": "text", "text": "You count."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Count to five."}]}],
        "max_tokens": 8,
    }
    whole = client.messages.create(**request, extra_body=GREEDY)  # type: ignore[call-overload]
    with client.messages.stream(**request, extra_body=GREEDY) as stream:  # type: ignore[arg-type]
        events = list(stream)
        streamed = stream.get_final_message()
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds and "message_delta" in kinds
    text = "".join(event.delta.text for event in events if event.type == "content_block_delta")  # type: ignore[union-attr]
    assert text == whole.content[0].text  # type: ignore[union-attr]
    assert streamed.content[0].text == text  # type: ignore[union-attr]
    assert whole.stop_reason == streamed.stop_reason and whole.stop_reason in ("end_turn", "max_tokens")
    assert streamed.usage.output_tokens == whole.usage.output_tokens
    prompt = streamed.usage.input_tokens + (streamed.usage.cache_read_input_tokens or 0)
    assert prompt == whole.usage.input_tokens + (whole.usage.cache_read_input_tokens or 0)


def test_usage_is_the_engines_count(server: ServerThread, client: anthropic.Anthropic) -> None:
    reply = client.messages.create(
        model="smollm2", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6, extra_body=GREEDY
    )
    # The same conversation on Ollama's route, which reports the engine's own counts.
    ollama_request = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Name a colour."}],
        "options": {"num_predict": 6, "temperature": 0},
        "stream": False,
    }
    answer = httpx.post(f"{server.url}/api/chat", json=ollama_request, timeout=120).json()
    assert reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0) == answer["prompt_eval_count"]
    assert reply.usage.output_tokens == answer["eval_count"]
    assert reply.content[0].text == answer["message"]["content"]  # type: ignore[union-attr]
    counted = client.messages.count_tokens(model="smollm2", messages=[{"role": "user", "content": "Name a colour."}])
    assert counted.input_tokens == answer["prompt_eval_count"]


def test_tool_round_trip(client: anthropic.Anthropic) -> None:
    forced = {"type": "tool", "name": "get_weather"}
    reply = client.messages.create(
        model="smollm2", messages=QUESTION, tools=[WEATHER], tool_choice=forced, max_tokens=64, extra_body=GREEDY
    )
    assert reply.stop_reason == "tool_use"
    calls = [block for block in reply.content if block.type == "tool_use"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].id
    assert isinstance(calls[0].input, dict)

    # Streamed, the call's input comes as input_json_delta and adds up to the same object.
    with client.messages.stream(
        model="smollm2", messages=QUESTION, tools=[WEATHER], tool_choice=forced, max_tokens=64, extra_body=GREEDY
    ) as stream:
        deltas = [event.delta.type for event in stream if event.type == "content_block_delta"]  # type: ignore[union-attr]
        streamed = stream.get_final_message()
    assert "input_json_delta" in deltas and streamed.stop_reason == "tool_use"
    streamed_calls = [block for block in streamed.content if block.type == "tool_use"]
    assert [(c.name, c.input) for c in streamed_calls] == [(calls[0].name, calls[0].input)]

    # The result goes back as a tool_result block answering the call's id.
    follow_up = client.messages.create(
        model="smollm2",
        messages=[
            *QUESTION,
            {"role": "assistant", "content": [block.model_dump() for block in reply.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": calls[0].id, "content": "sunny, 21 degrees"}],
            },
        ],
        tools=[WEATHER],
        max_tokens=20,
        extra_body=GREEDY,
    )
    assert follow_up.role == "assistant" and follow_up.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert follow_up.content


def test_errors(client: anthropic.Anthropic, server: ServerThread) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", messages=QUESTION, max_tokens=5)
    assert missing.value.status_code == 404
    assert missing.value.body["type"] == "error"  # type: ignore[index]
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        with client.messages.stream(model="no-such-model", messages=QUESTION, max_tokens=5) as stream:
            list(stream)

    answer = httpx.post(f"{server.url}/v1/messages", json={"model": "smollm2", "messages": QUESTION}, timeout=30)
    assert answer.status_code == 400
    assert answer.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "'max_tokens' is required"},
    }
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="smollm2", messages=[{"role": "system", "content": "hi"}], max_tokens=5)
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]

    # An image on a model without vision is refused, as on the other routes.
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError, match="does not support images"):
        client.messages.create(
            model="smollm2", messages=[{"role": "user", "content": [image]}], max_tokens=5, extra_body=GREEDY
        )


def test_thinking_on_a_model_that_cannot_think(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="thinking") as refused:
        client.messages.create(
            model="smollm2",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            thinking={"type": "enabled", "budget_tokens": 1024},
        )
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError, match="thinking"):
        with client.messages.stream(
            model="smollm2",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            thinking={"type": "enabled", "budget_tokens": 1024},
        ) as stream:
            list(stream)
