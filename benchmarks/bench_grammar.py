"""Constrained output speed: JSON-schema and `format="json"` decoding against free decoding.

Same model (SmolLM2 135M Q4_1), same prompt, greedy, 2 threads, one stream at a time:

- decode tokens/s (the runner's `eval_count / eval_duration`) of free output, of output under a
  small JSON schema (name, age, bio) and under `format="json"`, in alternating rounds; the target
  is constrained/free >= 0.8 (the grammar checks the chosen token, and masks the whole
  vocabulary only when that token is not allowed);
- the cost of the repeat penalty: Ollama's default sampling (temperature 0.8, top_k 40, top_p 0.9,
  fixed seed) with `repeat_penalty` 1.1 (Ollama's default until it moved to 1.0) against 1.0, free output.

    python benchmarks/bench_grammar.py
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import anyio
from common import smollm2_path

import localllm

THREADS = 2
NEW_TOKENS = 128
NUM_CTX = 2048
ROUNDS = 5
PROMPT = "Describe a person called Ana who is 34 years old, with a short bio, as JSON."
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "bio": {"type": "string"}},
    "required": ["name", "age", "bio"],
}
FREE_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
BASE = {"num_predict": NEW_TOKENS, "num_ctx": NUM_CTX, "num_thread": THREADS}
GREEDY = {**BASE, "temperature": 0, "repeat_penalty": 1.0}
SAMPLED = {**BASE, "seed": 42}  # Ollama's default temperature, top_k, top_p, repeat_last_n


async def decode_rate(
    engine: localllm.Engine, model: str, prompt: str, options: dict[str, Any], format: Any = None
) -> tuple[float, int, str]:
    """(decode tokens/s, tokens, text) of one generation."""
    reply = await engine.generate(model, prompt, format=format, options=options)
    if format is not None and reply.done_reason == "stop":
        json.loads(reply.response)  # constrained output must parse
    return reply.eval_count / (reply.eval_duration / 1e9), reply.eval_count, reply.response


async def bench(path: Path) -> dict[str, list[tuple[float, int, str]]]:
    model = str(path)
    runs: dict[str, list[tuple[float, int, str]]] = {}
    cases: list[tuple[str, str, dict[str, Any], Any]] = [
        ("free", PROMPT, GREEDY, None),
        ("schema", PROMPT, GREEDY, SCHEMA),
        ("json", PROMPT, GREEDY, "json"),
        ("penalty 1.1", FREE_PROMPT, {**SAMPLED, "repeat_penalty": 1.1}, None),
        ("penalty 1.0", FREE_PROMPT, {**SAMPLED, "repeat_penalty": 1.0}, None),
    ]
    with tempfile.TemporaryDirectory() as home:
        async with localllm.Engine(home, num_parallel=1) as engine:
            for _name, prompt, options, format in cases:  # load, warm up every path
                await decode_rate(engine, model, prompt, options, format)
            for _ in range(ROUNDS):
                for name, prompt, options, format in cases:
                    runs.setdefault(name, []).append(await decode_rate(engine, model, prompt, options, format))
    return runs


def main() -> None:
    path = smollm2_path()
    print(
        f"machine: {os.cpu_count()} CPUs (affinity {len(os.sched_getaffinity(0))}); model {path.name}; "
        f"{THREADS} threads, up to {NEW_TOKENS} new tokens, num_ctx {NUM_CTX}, median of {ROUNDS} alternating rounds"
    )
    runs = anyio.run(bench, path)
    rate = {name: statistics.median(r[0] for r in results) for name, results in runs.items()}
    tokens = {name: statistics.median(r[1] for r in results) for name, results in runs.items()}

    print("\ngreedy, repeat_penalty 1.0, same prompt")
    print(f"{'output':34} {'tokens':>7} {'decode tok/s':>13} {'vs free':>8}  target")
    for name, label in (("free", "free"), ("schema", "JSON schema (name, age, bio)"), ("json", 'format="json"')):
        target = "" if name == "free" else ">= 0.80"
        print(f"{label:34} {tokens[name]:7.0f} {rate[name]:13.1f} {rate[name] / rate['free']:8.2f}  {target}")
    print(f"  schema output: {runs['schema'][0][2][:100]!r}")

    print("\nOllama's default sampling (temperature 0.8, top_k 40, top_p 0.9, seed 42), free output")
    print(f"{'repeat_penalty':34} {'tokens':>7} {'decode tok/s':>13} {'vs 1.0':>8}")
    for name in ("penalty 1.0", "penalty 1.1"):
        ratio = rate[name] / rate["penalty 1.0"]
        print(f"{name.split()[1]:34} {tokens[name]:7.0f} {rate[name]:13.1f} {ratio:8.2f}")


if __name__ == "__main__":
    main()
