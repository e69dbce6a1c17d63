"""In Jupyter (or IPython), top-level `await` works: keep one engine open across cells.

    # cell 1
    import localllm
    engine = localllm.Engine()
    await engine.__aenter__()

    # cell 2
    reply = await engine.chat("smollm2", [{"role": "user", "content": "Hello!"}])
    print(reply.message.content)

    # last cell
    await engine.__aexit__(None, None, None)

This script does the same from a plain Python prompt.
"""

from __future__ import annotations

import anyio
from _models import bundled_smollm2

import localllm


async def main() -> None:
    engine = localllm.Engine()
    await engine.__aenter__()
    try:
        await engine.create("smollm2", from_=bundled_smollm2())
        reply = await engine.chat("smollm2", [{"role": "user", "content": "Hello!"}], options={"num_predict": 48})
        print(reply.message.content)
        print([p.name for p in (await engine.ps()).models])
    finally:
        await engine.__aexit__(None, None, None)


if __name__ == "__main__":
    anyio.run(main)
