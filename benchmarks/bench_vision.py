"""Images: the projector's cost per image, and the time to first token with a new image and with one
already in the cache, against llama-server given the same model and projector.

The projector is the tests' tiny random-weight LLaVA "mlp" one (`tests/projector.py`: 32x32 input, 16
embeddings of SmolLM2's width), paired with SmolLM2 135M Q4_1; greedy, 2 threads, one slot of 2048 tokens,
one new token, flash attention auto, weight repacking as localllm chooses it, on both sides. A "new" image
is one neither side has seen (its text before it is cached on both); a "cached" one is the same request
again. Rounds alternate between the two sides (llama-server stopped with SIGSTOP during localllm's turn: on
2 cores its idle threads slow the other side down); min / median / max over the rounds.

- encode: libmtmd's preprocessing, encoding and decoding of one image into a sequence (localllm's
  projector wrapper, timed alone);
- time to first token: a chat request with one image, `num_predict` 1, from sending to the reply.

    nox -s bench -- benchmarks/bench_vision.py
"""

from __future__ import annotations

import base64
import io
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx
from bench_server import cpu_flags, server_binary, spread, start_server
from common import smollm2_path
from PIL import Image

import localllm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from projector import TOKENS_PER_IMAGE, write_test_projector

ROUNDS = 5
THREADS = 2
NUM_CTX = 2048
QUESTION = "Describe this picture in one sentence."


def picture(index: int) -> bytes:
    """A 256x256 picture no earlier request has sent."""
    image = Image.new("RGB", (256, 256), ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256))
    image.putpixel((index % 256, 0), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def encode_times(model: Path, projector: Path, count: int) -> list[float]:
    """Seconds to preprocess, encode and decode one image into a sequence, `count` images."""
    from localllm.media import MediaLimits, decode_media
    from localllm.runner.llama import LlamaBackend
    from localllm.runner.protocol import LoadConfig

    backend = LlamaBackend()
    config = LoadConfig(str(model), num_ctx=NUM_CTX, num_parallel=1, num_thread=THREADS, projector_path=str(projector))
    loaded = backend.load_model(config, gpu_layers=0, tensor_split=None)
    context = backend.new_context(loaded, config)
    projector_ = backend.new_projector(loaded, config, gpu_layers=0)
    try:
        times = []
        for index in range(count):
            item = decode_media(picture(10_000 + index), limits=MediaLimits(), where="image")
            start = time.perf_counter()
            projector_.layout(item)
            status = projector_.evaluate(context, item, position=0, seq_id=0)
            times.append(time.perf_counter() - start)
            assert status == 0
            context.seq_rm(0, 0)
        return times
    finally:
        projector_.close()
        context.close()
        loaded.close()


async def localllm_round(engine: localllm.Engine, round_: int) -> dict[str, float]:
    options = {"temperature": 0, "num_predict": 1, "num_ctx": NUM_CTX, "num_thread": THREADS}
    messages = [{"role": "user", "content": QUESTION, "images": [picture(round_)]}]
    start = time.perf_counter()
    cold = await engine.chat("vis", messages, options=options)
    new = time.perf_counter() - start
    start = time.perf_counter()
    warm = await engine.chat("vis", messages, options=options)
    cached = time.perf_counter() - start
    assert warm.prompt_cached_count == warm.prompt_eval_count - 1, "the image was not reused"
    return {"tokens per image": float(TOKENS_PER_IMAGE), "ttft new image (ms)": new * 1e3,
            "ttft cached image (ms)": cached * 1e3, "prompt tokens": float(cold.prompt_eval_count)}  # fmt: skip


async def server_round(url: str, round_: int) -> dict[str, float]:
    data = base64.b64encode(picture(round_)).decode()
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": QUESTION},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                ],
            }
        ],
        "max_tokens": 1,
        "temperature": 0,
        "cache_prompt": True,
    }
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        start = time.perf_counter()
        cold = (await client.post("/v1/chat/completions", json=body)).json()
        new = time.perf_counter() - start
        start = time.perf_counter()
        (await client.post("/v1/chat/completions", json=body)).raise_for_status()
        cached = time.perf_counter() - start
    return {"tokens per image": float(TOKENS_PER_IMAGE), "ttft new image (ms)": new * 1e3,
            "ttft cached image (ms)": cached * 1e3, "prompt tokens": float(cold["usage"]["prompt_tokens"])}  # fmt: skip


def main() -> None:
    from localllm.runner.llama import repack_default

    model, binary, repack = smollm2_path(), server_binary(), repack_default()
    with tempfile.TemporaryDirectory() as scratch:
        projector = write_test_projector(Path(scratch) / "mmproj-test.gguf")
        print(f"machine: {sys.platform}; flags: {cpu_flags()}")
        print(
            f"{model.name} + the test projector (LLaVA mlp, {TOKENS_PER_IMAGE} embeddings per image); greedy, "
            f"{THREADS} threads, 1 slot x {NUM_CTX}, 1 new token, flash attention auto, repacking "
            f"{'on' if repack else 'off'}; {ROUNDS} alternating rounds (min / median / max)"
        )
        times = encode_times(model, projector, 20)
        print(f"\nencode one 256x256 image (preprocess, encode, decode into the sequence): "
              f"median {statistics.median(times) * 1e3:.1f} ms over {len(times)}")  # fmt: skip
        home = Path(scratch) / "home"

        async def create() -> None:
            async with localllm.Engine(home) as engine:
                d1, d2 = await engine.create_blob(model), await engine.create_blob(projector)
                await engine.create("vis", files={"model.gguf": d1, "mmproj.gguf": d2})

        # Created before the server starts (seconds): a file written in the last two seconds is checked on
        # every use, until it has settled.
        anyio.run(create)
        process, url = start_server(binary, model, repack, slots=1, extra=("--mmproj", str(projector)))
        ours: list[dict[str, float]] = []
        theirs: list[dict[str, float]] = []
        try:

            async def run_ours() -> None:
                async with localllm.Engine(home, num_parallel=1) as engine:
                    await localllm_round(engine, -1)  # warm-up: load
                    for round_ in range(ROUNDS):
                        theirs.append(await server_round(url, 100 + round_))
                        # The server is stopped while localllm runs: on 2 cores its idle threads still cost.
                        process.send_signal(signal.SIGSTOP)
                        try:
                            ours.append(await localllm_round(engine, round_))
                        finally:
                            process.send_signal(signal.SIGCONT)

            anyio.run(server_round, url, -1)  # warm-up
            anyio.run(run_ours)
        finally:
            process.terminate()
            process.wait()
    print(f"\n{'':28} {'localllm':>22} {'llama-server':>22} {'ratio':>18}")
    for name in ours[0]:
        a, b = [r[name] for r in ours], [r[name] for r in theirs]
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        print(f"{name:28} {spread(a, 1):>22} {spread(b, 1):>22} {spread(ratios, 2):>18}")


if __name__ == "__main__":
    main()
