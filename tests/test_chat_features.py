"""Tools, structured outputs and thinking end to end on the real SmolLM2 model."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

import localllm
from localllm import Engine

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"],
        },
    },
}

GREEDY = {"temperature": 0, "num_predict": 96}


async def test_forced_tool_call_is_well_formed(smollm2_path: Path, home: Path) -> None:
    async with Engine(home) as engine:
        chunks = [
            chunk
            async for chunk in engine.chat(
                str(smollm2_path),
                [{"role": "user", "content": "What's the weather in Paris?"}],
                tools=[WEATHER_TOOL],
                tool_choice="required",
                options=GREEDY,
            )
        ]
    calls = [call for chunk in chunks for call in chunk.message.tool_calls or ()]
    assert len(calls) == 1, chunks
    call = calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(call.function.arguments, WEATHER_TOOL["function"]["parameters"])
    assert isinstance(call.function.arguments["city"], str) and call.function.arguments["city"]
    assert call.id.startswith("call_") and len(call.id) == 13
    assert chunks[-1].done


async def test_agent_loop_runs_a_python_function_and_answers(smollm2_path: Path, home: Path) -> None:
    seen: list[str] = []

    def get_weather(city: str) -> str:
        """Get the current weather for a city.

        Args:
            city: The city name.
        """
        seen.append(city)
        return f"It is 18 degrees and sunny in {city}."

    events = []
    async with Engine(home) as engine:
        async for event in localllm.agent_loop(
            engine,
            str(smollm2_path),
            [{"role": "user", "content": "What's the weather in Paris?"}],
            [get_weather],
            tool_choice="required",
            options=GREEDY,
            max_rounds=3,
        ):
            events.append(event)
    kinds = [e.kind for e in events]
    assert seen, "the Python function was called"
    assert "tool_call" in kinds and "tool_result" in kinds
    results = [e for e in events if e.kind == "tool_result"]
    assert "18 degrees" in (results[0].result or "")
    final = events[-1]
    assert final.kind == "final"
    assert final.content, "the model answered after reading the tool's result"


async def test_json_schema_output_parses_and_validates(smollm2_path: Path, home: Path) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "role": {"enum": ["student", "teacher", "engineer"]},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 24}, "zip": {"type": "string", "maxLength": 10}},
                "required": ["city"],
            },
            "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},
        },
        "required": ["name", "age", "role", "address", "hobbies"],
    }
    async with Engine(home) as engine:
        reply = await engine.chat(
            str(smollm2_path),
            [{"role": "user", "content": "Describe a person called Ana who lives in Lisbon, as JSON."}],
            format=schema,
            options={"temperature": 0, "num_predict": 300},
        )
        anything = await engine.generate(
            str(smollm2_path),
            "Give me a JSON object about cats.",
            format="json",
            # A repeat penalty keeps this model's object short enough to close within num_predict.
            options={"temperature": 0, "num_predict": 120, "repeat_penalty": 1.1},
        )
    assert reply.done_reason == "stop"  # strings are bounded, so the object always closes in time
    data = json.loads(reply.message.content)
    jsonschema.validate(data, schema)
    assert isinstance(json.loads(anything.response), dict)


async def test_bad_format_and_unsupported_thinking_fail_before_generation(smollm2_path: Path, home: Path) -> None:
    async with Engine(home) as engine:
        with pytest.raises(localllm.InvalidFormat):
            await engine.chat(
                str(smollm2_path), [{"role": "user", "content": "hi"}], format={"type": "object", "not": {}}
            )
        with pytest.raises(localllm.InvalidFormat):
            await engine.generate(str(smollm2_path), "hi", format="yaml")
        with pytest.raises(localllm.CapabilityError, match="thinking"):
            await engine.chat(str(smollm2_path), [{"role": "user", "content": "hi"}], think=True)
        with pytest.raises(localllm.InvalidRequest, match="tool_choice"):
            await engine.chat(
                str(smollm2_path), [{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL], tool_choice="always"
            )
        # Refused while the prompt was prepared, before a runner was leased: nothing was loaded for them.
        assert await engine.scheduler.running() == []
