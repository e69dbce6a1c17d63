"""localllm against llama-server, llama.cpp's own C++ server on the same kernels: same model, threads,
slots, context, sampling and weight layouts, rounds alternating between the two.

SmolLM2 135M Q4_1, greedy, 2 threads, 4 slots of 2048 tokens, 128 new tokens, flash attention as llama.cpp
decides (auto) and weight repacking as localllm chooses it for this CPU, on both sides. Each round gives every prompt a
fresh prefix, so neither side answers from a prompt cache.

- single stream: decode tokens/s (first streamed token to last);
- four requests submitted at t=0: aggregate tokens/s over the wall time, and p95 time to first token.

llama-server is found through $LLAMA_SERVER, else where `../shared/tools/build-llama-server` puts it
(~/.cache/localllm-anchor/llama.cpp/build/bin/llama-server); that script builds it (about 10 minutes).

    nox -s bench -- benchmarks/bench_server.py
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import httpx
from common import p95, smollm2_path

import localllm

ROUNDS = 5
THREADS = 2
SLOTS = 4
NUM_CTX = 2048
NEW_TOKENS = 128
PROMPTS = [
    "The history of the printing press begins",
    "A recipe for a simple tomato soup:",
    "The three laws of motion state that",
    "Once upon a time, in a small village by the sea,",
]
DEFAULT_SERVER = Path.home() / ".cache/localllm-anchor/llama.cpp/build/bin/llama-server"

Stream = tuple[float, float, int]  # (time to first token from the start, decode tokens/s, tokens)


def server_binary() -> Path:
    path = Path(os.environ.get("LLAMA_SERVER", DEFAULT_SERVER))
    if not path.is_file():
        sys.exit(
            f"llama-server not found at {path}: build it with ../shared/tools/build-llama-server, or set LLAMA_SERVER"
        )
    return path


def figures(single: Stream, concurrent: list[Stream], wall: float) -> dict[str, float]:
    return {
        "single-stream decode, tokens/s": single[1],
        "4 requests, aggregate tokens/s": sum(s[2] for s in concurrent) / wall,
        "4 requests, p95 time to first token, s": p95([s[0] for s in concurrent]),
    }


async def four_at_once(one: object, round_: int) -> tuple[list[Stream], float]:
    results: list[Stream] = []
    start = time.perf_counter()

    async def run(prompt: str) -> None:
        results.append(await one(f"[{round_}] {prompt}", start))  # type: ignore[operator]

    async with anyio.create_task_group() as group:
        for prompt in PROMPTS:
            group.start_soon(run, prompt)
    return results, time.perf_counter() - start


# -- llama-server ------------------------------------------------------------------------------------


async def server_stream(client: httpx.AsyncClient, prompt: str, start: float) -> Stream:
    body = {"prompt": prompt, "n_predict": NEW_TOKENS, "temperature": 0, "repeat_penalty": 1.0, "stream": True}
    first = last = 0.0
    count = 0
    async with client.stream("POST", "/completion", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("content"):
                last = time.perf_counter()
                first = first or last
                count += 1
    return first - start, (count - 1) / (last - first), count


async def measure_server(url: str, round_: int) -> dict[str, float]:
    # A fresh connection per request: llama-server may close an idle kept-alive one under us.
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=fresh) as client:
        single = await server_stream(client, f"[{round_}] {PROMPTS[0]}", time.perf_counter())
        concurrent, wall = await four_at_once(lambda p, s: server_stream(client, p, s), round_)
    return figures(single, concurrent, wall)


def start_server(
    binary: Path, model: Path, repack: bool, *, slots: int = SLOTS, extra: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
        "-t", str(THREADS), "-tb", str(THREADS), "-np", str(slots), "-c", str(NUM_CTX * slots),
        "-b", "512", "-ub", "512", "-fa", "auto", "--repack" if repack else "--no-repack",
        "--no-kv-unified", "--cache-ram", "0", *extra,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    sys.exit("llama-server did not become ready in 120 s")


# -- localllm (in a child process per round, so its threads never overlap the server's) ----------------


async def localllm_stream(engine: localllm.Engine, model: str, prompt: str, start: float) -> Stream:
    options = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": NEW_TOKENS, "num_ctx": NUM_CTX}
    first = last = 0.0
    count = 0
    async for chunk in engine.generate(model, prompt, raw=True, options={**options, "num_thread": THREADS}):
        if chunk.response:
            last = time.perf_counter()
            first = first or last
            count += 1
    return first - start, (count - 1) / (last - first), count


async def measure_localllm(model: str, round_: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as home:
        async with localllm.Engine(home, num_parallel=SLOTS) as engine:
            load = {"num_predict": 1, "num_ctx": NUM_CTX, "num_thread": THREADS}
            await engine.generate(model, "Hello", raw=True, options=load)  # load, with the options measured
            single = await localllm_stream(engine, model, f"[{round_}] {PROMPTS[0]}", time.perf_counter())
            concurrent, wall = await four_at_once(lambda p, s: localllm_stream(engine, model, p, s), round_)
    return figures(single, concurrent, wall)


def run_localllm_child(model: Path, round_: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(model), str(round_)], check=True, capture_output=True, text=True
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return " ".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))))


def main() -> None:
    from localllm.runner.llama import repack_default

    model, binary, repack = smollm2_path(), server_binary(), repack_default()
    print(f"machine: {os.cpu_count()} CPUs; flags: {cpu_flags()}")
    print(
        f"{model.name}; greedy, {THREADS} threads, {SLOTS} slots x {NUM_CTX}, {NEW_TOKENS} new tokens, flash "
        f"attention auto, repacking {'on' if repack else 'off'}; {ROUNDS} alternating rounds (min / median / max)"
    )
    process, url = start_server(binary, model, repack)
    ours: list[dict[str, float]] = []
    theirs: list[dict[str, float]] = []
    try:
        anyio.run(measure_server, url, -1)  # warm-up
        for round_ in range(ROUNDS):
            theirs.append(anyio.run(measure_server, url, round_))
            ours.append(run_localllm_child(model, round_))
    finally:
        process.terminate()
        process.wait()
    print(f"\n{'':40} {'localllm':>22} {'llama-server':>22} {'ratio':>20}")
    for name in ours[0]:
        a, b = [r[name] for r in ours], [r[name] for r in theirs]
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        print(f"{name:40} {spread(a):>22} {spread(b):>22} {spread(ratios, 2):>20}")


def spread(values: list[float], digits: int = 3) -> str:
    return " ".join(f"{v:.{digits}f}" for v in (min(values), statistics.median(values), max(values)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(anyio.run(measure_localllm, sys.argv[2], int(sys.argv[3]))))
    else:
        main()
