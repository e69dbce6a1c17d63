"""What a runner in a child process costs: `isolation="process"` against the default worker thread.

Same model (SmolLM2 135M Q4_1), same prompts, greedy, 2 threads, 128 new tokens. Both engines are
open at once and the rounds alternate (thread, process, thread, ...), so a machine that slows down
during the run slows both alike.

- single stream: decode tokens/s (first streamed token to last);
- four requests submitted at t=0, served concurrently (4 slots): aggregate tokens/s over the wall
  time, and p95 time-to-first-token.

Target: the process runner within 5% of the thread runner on throughput.

    nox -s bench -- benchmarks/bench_isolation.py      (or: python benchmarks/bench_isolation.py)
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import anyio
from common import p95, smollm2_path

import localllm

THREADS = 2
NEW_TOKENS = 128
NUM_CTX = 2048
ROUNDS = 5
PROMPTS = [
    "The history of the printing press begins",
    "A recipe for a simple tomato soup:",
    "The three laws of motion state that",
    "Once upon a time, in a small village by the sea,",
]
OPTIONS = {
    "temperature": 0,
    "repeat_penalty": 1.0,
    "num_predict": NEW_TOKENS,
    "num_ctx": NUM_CTX,
    "num_thread": THREADS,
}
MODES = ("thread", "process")


async def stream(engine: localllm.Engine, model: str, prompt: str, start: float) -> tuple[float, float, int]:
    """(time to first token from `start`, decode tokens/s, tokens)."""
    first = last = None
    count = 0
    async for chunk in engine.generate(model, prompt, raw=True, options=OPTIONS):
        if chunk.done:
            break
        now = time.perf_counter()
        first = first or now
        last = now
        count += 1
    assert first is not None and last is not None
    return first - start, (count - 1) / (last - first), count


async def concurrent(engine: localllm.Engine, model: str) -> tuple[float, float]:
    """(aggregate tokens/s, p95 TTFT) of the four prompts served together."""
    results: list[tuple[float, float, int]] = []
    start = time.perf_counter()

    async def one(prompt: str) -> None:
        results.append(await stream(engine, model, prompt, start))

    async with anyio.create_task_group() as group:
        for prompt in PROMPTS:
            group.start_soon(one, prompt)
    return sum(r[2] for r in results) / (time.perf_counter() - start), p95([r[0] for r in results])


async def bench(path: Path) -> dict[str, dict[str, float]]:
    model = str(path)
    samples: dict[str, dict[str, list[float]]] = {m: {"single": [], "aggregate": [], "ttft_p95": []} for m in MODES}
    with tempfile.TemporaryDirectory() as home:
        engines = {
            mode: localllm.Engine(home, num_parallel=len(PROMPTS), isolation=mode, prompt_cache_size=0, keep_alive=-1)
            for mode in MODES
        }
        try:
            for engine in engines.values():
                await stream(engine, model, PROMPTS[0], time.perf_counter())  # load + warm-up
                await concurrent(engine, model)
            for _ in range(ROUNDS):
                for mode, engine in engines.items():
                    samples[mode]["single"].append((await stream(engine, model, PROMPTS[0], time.perf_counter()))[1])
                    aggregate, ttft = await concurrent(engine, model)
                    samples[mode]["aggregate"].append(aggregate)
                    samples[mode]["ttft_p95"].append(ttft)
        finally:
            for engine in engines.values():
                await engine.aclose()
    return {mode: {key: statistics.median(values) for key, values in m.items()} for mode, m in samples.items()}


def main() -> None:
    path = smollm2_path()
    print(
        f"machine: {os.cpu_count()} CPUs (affinity {len(os.sched_getaffinity(0))}); model {path.name}; "
        f"greedy, {THREADS} threads, {NEW_TOKENS} new tokens, num_ctx {NUM_CTX}, "
        f"median of {ROUNDS} alternating rounds"
    )
    result = anyio.run(bench, path)
    thread, process = result["thread"], result["process"]
    rows = [
        ("single-stream decode (tokens/s)", "single", ">= 0.95"),
        ("4 requests aggregate (tokens/s)", "aggregate", ">= 0.95"),
        ("4 requests p95 TTFT (s)", "ttft_p95", "-"),
    ]
    print(f"\n{'metric':34} {'thread':>10} {'process':>10} {'ratio':>7}  target")
    for label, key, target in rows:
        print(f"{label:34} {thread[key]:10.3f} {process[key]:10.3f} {process[key] / thread[key]:7.2f}  {target}")


if __name__ == "__main__":
    main()
