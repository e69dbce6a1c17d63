"""Structured outputs: a JSON schema constrains sampling, so the reply always parses and validates.

python examples/structured_output.py
"""

from __future__ import annotations

import json

import anyio
from _models import bundled_smollm2

import localllm

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 32},
        "capital": {"type": "string", "maxLength": 32},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},
    },
    "required": ["name", "capital", "languages"],
}


async def main() -> None:
    async with localllm.Engine() as engine:
        await engine.create("smollm2", from_=bundled_smollm2())
        reply = await engine.chat(
            "smollm2",
            [{"role": "user", "content": "Tell me about Canada."}],
            format=SCHEMA,
            options={"temperature": 0},
        )
        print(json.dumps(json.loads(reply.message.content), indent=2))


if __name__ == "__main__":
    anyio.run(main)
