"""A multi-turn chat in the terminal, streamed; each turn re-evaluates only the new text.

python examples/streaming_chat.py
"""

from __future__ import annotations

import anyio
from _models import bundled_smollm2

import localllm


async def main() -> None:
    async with localllm.Engine() as engine:
        await engine.create("smollm2", from_=bundled_smollm2())
        messages: list[dict[str, str]] = []
        for question in ("Name a famous painter.", "Which century did they live in?"):
            print(f">>> {question}")
            messages.append({"role": "user", "content": question})
            answer = []
            async for chunk in engine.chat("smollm2", messages, options={"temperature": 0, "num_predict": 128}):
                print(chunk.message.content, end="", flush=True)
                answer.append(chunk.message.content)
                if chunk.done:
                    print(f"\n[prompt tokens evaluated: {chunk.prompt_eval_count}]\n")
            messages.append({"role": "assistant", "content": "".join(answer)})


if __name__ == "__main__":
    anyio.run(main)
