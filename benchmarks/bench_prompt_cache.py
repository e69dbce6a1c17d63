"""What reusing evaluated prompts saves: time to first token with a shared 1,500-token system prompt.

SmolLM2 135M Q4_1, greedy, 2 threads, 4 slots of 2048 tokens. Each round uses a fresh system prompt, so
nothing carries over between rounds.

- shared prefix: user 1 sends the system prompt and a question; once user 1's first token is out,
  users 2-4 send theirs at once (same system prompt, their own questions). Their prompts start from
  user 1's slot, copied over, instead of being evaluated again.
- back from RAM: one slot; conversation A, then B (A's state goes to the RAM cache), then A again.
- across restarts: a new process with `prompt_cache=True` asks what an earlier process asked; the first
  request starts from the state on disk. Cold is the same request in a new process with an empty cache
  directory. Both time the request alone, from submission to first token, model already loaded.

    nox -s bench -- benchmarks/bench_prompt_cache.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time

import anyio
from common import smollm2_path

import localllm

ROUNDS = 3
OPTIONS = {"temperature": 0, "num_ctx": 2048, "num_thread": 2}
QUESTIONS = ["What is the longest river?", "Name a bridge.", "Which fact is first?", "Sum two facts."]


def system_prompt(round_: int) -> str:
    """About 1,500 tokens of SmolLM2, different in each round."""
    facts = (
        f"Fact {i}: the {['river', 'bridge', 'tower'][i % 3]} {round_} is {i * 7 % 13} meters long." for i in range(90)
    )
    return f"Round {round_}. You answer briefly. " + " ".join(facts)


def prompt(system: str, question: str) -> str:
    return f"{system}\n\nQuestion: {question}\nAnswer:"


async def time_to_first_token(engine: localllm.Engine, model: str, text: str, new_tokens: int = 8) -> tuple[float, int]:
    """(seconds to the first token, prompt tokens taken from a cache)."""
    started = time.perf_counter()
    first = 0.0
    cached = 0
    options = {**OPTIONS, "num_predict": new_tokens}
    async for chunk in engine.generate(model, text, raw=True, options=options):
        if not first:
            first = time.perf_counter() - started
        if chunk.done:
            cached = chunk.prompt_cached_count or 0
    return first, cached


async def shared_prefix(model: str, round_: int) -> tuple[float, list[float], int]:
    system = system_prompt(round_)
    with tempfile.TemporaryDirectory() as home:
        async with localllm.Engine(home, num_parallel=4) as engine:
            await engine.load(model, options=OPTIONS)
            first_out = anyio.Event()
            user1: list[float] = []
            others: list[tuple[float, int]] = []

            async def first_user() -> None:
                started = time.perf_counter()
                options = {**OPTIONS, "num_predict": 64}
                async for _ in engine.generate(model, prompt(system, QUESTIONS[0]), raw=True, options=options):
                    if not user1:
                        user1.append(time.perf_counter() - started)
                        first_out.set()

            async def other_user(question: str) -> None:
                others.append(await time_to_first_token(engine, model, prompt(system, question)))

            async with anyio.create_task_group() as group:
                group.start_soon(first_user)
                await first_out.wait()
                for question in QUESTIONS[1:]:
                    group.start_soon(other_user, question)
    return user1[0], [ttft for ttft, _ in others], min(cached for _, cached in others)


async def back_from_ram(model: str, round_: int) -> tuple[float, float, int]:
    a, b = prompt(system_prompt(round_), QUESTIONS[0]), prompt(system_prompt(round_ + 10), QUESTIONS[0])
    with tempfile.TemporaryDirectory() as home:
        async with localllm.Engine(home, num_parallel=1) as engine:
            await engine.load(model, options=OPTIONS)
            cold, _ = await time_to_first_token(engine, model, a)
            await time_to_first_token(engine, model, b)
            warm, cached = await time_to_first_token(engine, model, a)
    return cold, warm, cached


CHILD = """
import sys, time, anyio, localllm

async def main():
    home, model, text = sys.argv[1], sys.argv[2], sys.stdin.read()
    options = {options!r}
    async with localllm.Engine(home, num_parallel=4, prompt_cache=True) as engine:
        await engine.load(model, options=options)
        started = time.perf_counter()
        async for chunk in engine.generate(model, text, raw=True, options={{**options, "num_predict": 8}}):
            first = time.perf_counter() - started
            break
    print(first)

anyio.run(main)
"""


def in_new_process(home: str, model: str, text: str) -> float:
    script = CHILD.format(options=OPTIONS)
    done = subprocess.run(
        [sys.executable, "-c", script, home, model], input=text, capture_output=True, text=True, check=True
    )
    return float(done.stdout.split()[-1])


def across_restarts(model: str, round_: int) -> tuple[float, float]:
    text = prompt(system_prompt(round_ + 20), QUESTIONS[0])
    with tempfile.TemporaryDirectory() as home:
        cold = in_new_process(home, model, text)  # evaluates, and leaves the state on disk
        warm = in_new_process(home, model, text)
    return cold, warm


def spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def main() -> None:
    model = str(smollm2_path())
    first_users, other_users, copied = [], [], []
    ram_cold, ram_warm, restored = [], [], []
    disk_cold, disk_warm = [], []
    for round_ in range(ROUNDS):
        user1, others, cached = anyio.run(shared_prefix, model, round_)
        first_users.append(user1)
        other_users.append(max(others))
        copied.append(cached)
        cold, warm, cached = anyio.run(back_from_ram, model, round_)
        ram_cold.append(cold)
        ram_warm.append(warm)
        restored.append(cached)
        cold, warm = across_restarts(model, round_)
        disk_cold.append(cold)
        disk_warm.append(warm)
        print(f"round {round_ + 1}/{ROUNDS} done", file=sys.stderr)

    def ratio(a: list[float], b: list[float]) -> str:
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        return f"{min(ratios):.3f} / {statistics.median(ratios):.3f} / {max(ratios):.3f}"

    print(f"prompt cache, SmolLM2 Q4_1, 1,500-token system prompt, {ROUNDS} rounds (min / median / max)")
    print("| figure | without reuse, s | with reuse, s | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| users 2-4 after user 1 (slowest of three) | {spread(first_users)} | {spread(other_users)} "
        f"| {ratio(other_users, first_users)} | <= 0.2 |"
    )
    print(f"| a conversation back from RAM | {spread(ram_cold)} | {spread(ram_warm)} | {ratio(ram_warm, ram_cold)} | |")
    print(
        f"| a new process, state on disk | {spread(disk_cold)} | {spread(disk_warm)} "
        f"| {ratio(disk_warm, disk_cold)} | <= 0.25 |"
    )
    print(f"prompt tokens reused: copied across slots {min(copied)}+, from RAM {min(restored)}+")


if __name__ == "__main__":
    main()
