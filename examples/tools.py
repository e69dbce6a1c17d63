"""Tools: a Python function becomes a tool; the agent loop calls it and feeds the result back.

SmolLM2's template has no native tool support, so localllm describes the tools in the prompt and
constrains the call with a grammar built from the function's signature.

    python examples/tools.py
"""

from __future__ import annotations

from typing import Literal

import anyio
from _models import bundled_smollm2

import localllm


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
    """Get the current weather for a city.

    Args:
        city: The city name, e.g. Paris.
        unit: The temperature unit.
    """
    return f"18 degrees {unit} and sunny in {city}"


async def main() -> None:
    async with localllm.Engine() as engine:
        await engine.create("smollm2", from_=bundled_smollm2())

        # One call, forced: the reply's message carries the tool call.
        reply = await engine.chat(
            "smollm2",
            [{"role": "user", "content": "What's the weather in Paris?"}],
            tools=[get_weather],
            tool_choice="required",
            options={"temperature": 0},
        )
        for call in reply.message.tool_calls or ():
            print(f"call: {call.function.name}({call.function.arguments})")

        # The agent loop: chat -> run the tool -> chat again with its result.
        async for event in localllm.agent_loop(
            engine,
            "smollm2",
            [{"role": "user", "content": "What's the weather in Rome?"}],
            [get_weather],
            tool_choice="required",
            options={"temperature": 0, "num_predict": 96},
        ):
            if event.kind == "tool_call":
                print(f"\n[calling {event.call.function.name} {event.call.function.arguments}]")
            elif event.kind == "tool_result":
                print(f"[result: {event.result}]")
            elif event.kind == "content":
                print(event.content, end="", flush=True)
        print()


if __name__ == "__main__":
    anyio.run(main)
