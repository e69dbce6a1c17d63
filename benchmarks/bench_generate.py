"""Decode speed and time-to-first-token: localllm against llama-cpp-python, same run, same settings.

Same model (SmolLM2 135M Q4_1), same prompts, greedy, 2 threads, 128 new tokens.

- single stream: decode tokens/s (first streamed token to last), localllm `generate(raw=True)`
  against llama-cpp-python's `Llama.create_completion(stream=True)`;
- four requests: localllm serving them concurrently (4 slots, continuous batching) against
  llama-cpp-python serving the same four one after another; aggregate tokens/s over the wall
  time and p95 time-to-first-token, all four submitted at t=0.

    nox -s bench          (or: python benchmarks/bench_generate.py)
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
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
ROUNDS = 3
PROMPTS = [
    "The history of the printing press begins",
    "A recipe for a simple tomato soup:",
    "The three laws of motion state that",
    "Once upon a time, in a small village by the sea,",
]


# -- llama-cpp-python ------------------------------------------------------------------


def reference_stream(llm, prompt: str, start: float) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    """(time to first token from `start`, decode tokens/s, tokens)."""
    first = last = None
    count = 0
    for _chunk in llm.create_completion(
        prompt, max_tokens=NEW_TOKENS, temperature=0.0, repeat_penalty=1.0, stream=True
    ):
        now = time.perf_counter()
        first = first or now
        last = now
        count += 1
    assert first is not None and last is not None
    return first - start, (count - 1) / (last - first), count


def bench_reference(path: Path, flash_attention: bool) -> dict[str, float]:
    from localllm.runner.llama import reference_llama

    llm = reference_llama(
        str(path),
        n_ctx=NUM_CTX,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        n_batch=512,
        flash_attn=flash_attention,
        verbose=False,
    )
    reference_stream(llm, PROMPTS[0], time.perf_counter())  # warm-up
    single = []
    for _ in range(ROUNDS):
        llm.reset()
        single.append(reference_stream(llm, PROMPTS[0], time.perf_counter())[1])
    aggregate, ttft_p95 = [], []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        ttfts, tokens = [], 0
        for prompt in PROMPTS:  # one after another: Llama serves one sequence
            llm.reset()
            ttft, _rate, count = reference_stream(llm, prompt, start)
            ttfts.append(ttft)
            tokens += count
        aggregate.append(tokens / (time.perf_counter() - start))
        ttft_p95.append(p95(ttfts))
    del llm
    return {
        "single": statistics.median(single),
        "aggregate": statistics.median(aggregate),
        "ttft_p95": statistics.median(ttft_p95),
    }


# -- localllm ---------------------------------------------------------------------------


async def localllm_stream(engine: localllm.Engine, model: str, prompt: str, start: float) -> tuple[float, float, int]:
    first = last = None
    count = 0
    options = {
        "temperature": 0,
        "repeat_penalty": 1.0,
        "num_predict": NEW_TOKENS,
        "num_ctx": NUM_CTX,
        "num_thread": THREADS,
    }
    async for chunk in engine.generate(model, prompt, raw=True, options=options):
        if chunk.done:
            break
        now = time.perf_counter()
        first = first or now
        last = now
        count += 1
    assert first is not None and last is not None
    return first - start, (count - 1) / (last - first), count


async def bench_localllm(path: Path, flash_attention: bool) -> dict[str, float]:
    model = str(path)
    with tempfile.TemporaryDirectory() as home:
        async with localllm.Engine(home, num_parallel=len(PROMPTS), flash_attention=flash_attention) as engine:
            await localllm_stream(engine, model, PROMPTS[0], time.perf_counter())  # load + warm-up
            single = [(await localllm_stream(engine, model, PROMPTS[0], time.perf_counter()))[1] for _ in range(ROUNDS)]
            aggregate, ttft_p95 = [], []
            for _ in range(ROUNDS):
                results: list[tuple[float, float, int]] = []
                start = time.perf_counter()

                async def one(prompt: str, start: float = start, results: list = results) -> None:
                    results.append(await localllm_stream(engine, model, prompt, start))

                async with anyio.create_task_group() as group:
                    for prompt in PROMPTS:
                        group.start_soon(one, prompt)
                aggregate.append(sum(r[2] for r in results) / (time.perf_counter() - start))
                ttft_p95.append(p95([r[0] for r in results]))
    return {
        "single": statistics.median(single),
        "aggregate": statistics.median(aggregate),
        "ttft_p95": statistics.median(ttft_p95),
    }


def run_localllm(path: Path, flash_attention: bool) -> dict[str, float]:
    return anyio.run(bench_localllm, path, flash_attention)


def main() -> None:
    path = smollm2_path()
    cores = os.cpu_count()
    print(
        f"machine: {cores} CPUs (affinity {len(os.sched_getaffinity(0))}); model {path.name}; "
        f"greedy, {THREADS} threads, {NEW_TOKENS} new tokens, num_ctx {NUM_CTX}, median of {ROUNDS} rounds"
    )
    for flash_attention in (False, True):
        # Each side runs in its own process, so neither's threads or memory affect the other.
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            reference = pool.submit(bench_reference, path, flash_attention).result()
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            ours = pool.submit(run_localllm, path, flash_attention).result()
        rows = [
            ("single-stream decode (tokens/s)", "single", ours["single"] / reference["single"], ">= 1.10"),
            ("4 requests aggregate (tokens/s)", "aggregate", ours["aggregate"] / reference["aggregate"], ">= 1.20"),
            ("4 requests p95 TTFT (s)", "ttft_p95", ours["ttft_p95"] / reference["ttft_p95"], "<= 0.25"),
        ]
        print(f"\nflash attention {'on' if flash_attention else 'off (default)'} on both sides")
        print(f"{'metric':34} {'localllm':>10} {'llama-cpp-python':>17} {'ratio':>7}  target")
        for label, key, ratio, target in rows:
            print(f"{label:34} {ours[key]:10.3f} {reference[key]:17.3f} {ratio:7.2f}  {target}")


if __name__ == "__main__":
    main()
