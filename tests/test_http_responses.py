"""OpenAI's Responses API on the shim, driven by the official `openai` client and the OpenAI Agents SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import agents
import httpx
import ollama
import openai
import pytest
from servers import localllm_shim

from localllm.http import ServerThread

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
FORCED = {"type": "function", "name": "get_weather"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[ServerThread]:
    with localllm_shim(tmp_path_factory.mktemp("home"), smollm2_path) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


def test_text_response_with_the_engines_token_counts(server: ServerThread, client: openai.OpenAI) -> None:
    reply = client.responses.create(
        model="smollm2",
        instructions="Be brief.",
        input="Say hello.",
        temperature=0,
        max_output_tokens=12,
    )
    assert reply.object == "response" and reply.id.startswith("resp_") and reply.model == "smollm2"
    message = reply.output[-1]
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text" and message.content[0].text == reply.output_text
    assert reply.output_text

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    with ollama.Client(host=server.url) as native:
        engine = native.chat("smollm2", messages, options={"temperature": 0, "top_p": 1, "num_predict": 12})
    assert reply.output_text == engine.message.content
    assert reply.usage is not None
    assert reply.usage.input_tokens == engine.prompt_eval_count
    assert reply.usage.output_tokens == engine.eval_count
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens
    cut = engine.done_reason == "length"
    assert reply.status == ("incomplete" if cut else "completed")
    assert (reply.incomplete_details is not None and reply.incomplete_details.reason == "max_output_tokens") == cut


def test_stream_agrees_with_the_whole_response(client: openai.OpenAI) -> None:
    request = {"model": "smollm2", "input": "Count to five.", "temperature": 0, "max_output_tokens": 8}
    whole = client.responses.create(**request)  # type: ignore[call-overload]
    assert whole.status == "incomplete" and whole.incomplete_details is not None
    assert whole.incomplete_details.reason == "max_output_tokens"

    with client.responses.stream(**request) as stream:
        events = list(stream)
    # Cut by max_output_tokens, a stream ends as OpenAI's does: with response.incomplete (whose response the
    # client's get_final_response does not take), not response.completed.
    assert events[-1].type == "response.incomplete"
    final = events[-1].response
    assert final.status == "incomplete" and [item.type for item in final.output] == ["message"]
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == whole.output_text == final.output_text
    assert final.usage is not None and whole.usage is not None
    assert final.usage.output_tokens == whole.usage.output_tokens == 8
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_forced_function_call_and_its_output(client: openai.OpenAI) -> None:
    question = {"role": "user", "content": "What is the weather in Paris?"}
    reply = client.responses.create(
        model="smollm2",
        input=[question],
        tools=[WEATHER_TOOL],
        tool_choice=FORCED,
        temperature=0,  # type: ignore[list-item]
    )
    calls = [item for item in reply.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    assert isinstance(json.loads(calls[0].arguments), dict)

    with client.responses.stream(
        model="smollm2",
        input=[question],  # type: ignore[list-item]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice=FORCED,
        temperature=0,
    ) as streamed:
        events = list(streamed)
        final = streamed.get_final_response()
    added = [e for e in events if e.type == "response.output_item.added" and e.item.type == "function_call"]
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(added) == 1 and added[0].item.name == "get_weather"
    assert len(done) == 1 and json.loads(done[0].arguments) == json.loads(calls[0].arguments)
    assert events[-1].type == "response.completed" and final.status == "completed"
    assert [(item.type, item.name, item.arguments) for item in final.output] == [  # type: ignore[union-attr]
        ("function_call", call.name, call.arguments) for call in calls
    ]

    call = calls[0]
    answer = client.responses.create(
        model="smollm2",
        input=[
            question,
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 22 degrees."},
        ],  # type: ignore[list-item]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="none",
        temperature=0,
        max_output_tokens=30,
    )
    assert [item.type for item in answer.output] == ["message"] and answer.output_text


def test_json_schema_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"age": {"type": "integer"}},
        "required": ["age"],
        "additionalProperties": False,
    }
    reply = client.responses.create(
        model="smollm2",
        input="How old is a young cat? Answer as JSON.",
        temperature=0,
        max_output_tokens=30,
        text={"format": {"type": "json_schema", "name": "age", "schema": schema, "strict": True}},
    )
    assert isinstance(json.loads(reply.output_text)["age"], int)


def test_agents_sdk_runs_a_turn_with_a_tool(server: ServerThread) -> None:
    agents.set_tracing_disabled(True)
    asked: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        asked.append(city)
        return "Sunny, 22 degrees."

    shim = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    agent = agents.Agent(
        name="weather",
        instructions="Answer questions about the weather.",
        tools=[get_weather],
        model=agents.OpenAIResponsesModel(model="smollm2", openai_client=shim),
        # The first turn must call the tool (a 135M model would not choose to); the SDK then lets it answer.
        model_settings=agents.ModelSettings(tool_choice="get_weather", temperature=0, max_tokens=30),
        reset_tool_choice=True,
    )
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=3)
    assert len(asked) == 1
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"
    assert isinstance(result.final_output, str) and result.final_output


def test_errors(client: openai.OpenAI, server: ServerThread) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="no-such-model", input="hi")
    assert missing.value.status_code == 404
    assert isinstance(missing.value.body, dict) and missing.value.body["code"] == "model_not_found"

    with pytest.raises(openai.BadRequestError) as stateful:
        client.responses.create(model="smollm2", input="hi", previous_response_id="resp_123")
    assert "previous_response_id" in str(stateful.value)

    bad_requests = [
        {"model": "smollm2"},
        {"model": "smollm2", "input": [{"type": "item_reference", "id": "msg_1"}]},
        {"model": "smollm2", "input": "hi", "tools": [{"type": "web_search"}]},
        {"model": "smollm2", "input": "hi", "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "name": "x"}},
        {"model": "smollm2", "input": "hi", "reasoning": {"effort": "extreme"}},
        {"model": "smollm2", "input": "hi", "text": {"format": {"type": "xml"}}},
        {"model": "smollm2", "input": "hi", "max_output_tokens": 0},
    ]
    for body in bad_requests:
        answer = httpx.post(f"{server.url}/v1/responses", json=body, timeout=60)
        assert answer.status_code == 400, body
        assert answer.json()["error"]["type"] == "invalid_request_error", body
