"""Speculative decoding: single-stream greedy decode speed without drafts, with prompt lookup, with a draft model.

Target: SmolLM2 135M requantized to Q8_0 from the bundled Q4_1 file; draft model: the Q4_1 file itself
(same vocabulary, close enough for most drafts to be accepted). Two prompts: one that makes the model
copy a paragraph from its prompt (where prompt lookup shines) and a free story. Greedy, 2 threads,
128 new tokens; the three ways take turns in each round, and the figures are medians over the rounds.
Decode tokens/s is the response's own `eval_count / eval_duration` (first token to last); acceptance is
drafted tokens the target confirmed, over those drafted. Also measured: how much cheaper a token of the
draft model is than one of the target (both without drafts).

    python benchmarks/bench_speculative.py
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from common import smollm2_path

import localllm

THREADS = 2
NEW_TOKENS = 128
NUM_CTX = 2048
ROUNDS = 3
PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. The early bird catches the worm, but the second mouse "
    "gets the cheese. A journey of a thousand miles begins with a single step."
)
PROMPTS = {
    "copying": f"Copy the paragraph.\n\nParagraph: {PARAGRAPH}\n\nCopy: {PARAGRAPH}\n\nParagraph: {PARAGRAPH}\n\nCopy:",
    "story": (
        "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"
    ),
}


def requantize_q8_0(source: Path, destination: Path) -> Path:
    """The Q4_1 file requantized to Q8_0 (localllm's quantizer takes only unquantized sources)."""
    import llama_cpp

    from localllm.runner.llama import ensure_backend

    ensure_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = THREADS
    if llama_cpp.llama_model_quantize(str(source).encode(), str(destination).encode(), params) != 0:
        sys.exit("llama.cpp could not requantize the model")
    return destination


async def decode_rate(engine: localllm.Engine, model: str, prompt: str, **options: Any) -> float:
    reply = await engine.generate(
        model,
        prompt,
        raw=True,
        options={
            "temperature": 0,
            "repeat_penalty": 1.0,
            "num_predict": NEW_TOKENS,
            "num_ctx": NUM_CTX,
            "num_thread": THREADS,
            **options,
        },
    )
    assert reply.eval_count and reply.eval_duration
    return (reply.eval_count - 1) / (reply.eval_duration / 1e9)


async def runner_for(engine: localllm.Engine, **match: Any) -> Any:
    """The loaded runner whose load configuration has these values."""
    for record in await engine.scheduler.running():
        if all(getattr(record.key, name) == value for name, value in match.items()):
            return record.runner
    raise LookupError(match)


async def bench(targets: dict[str, Path], draft: Path) -> None:
    """`targets`: a copy of the target's file for each way, since an engine keeps one runner per model file
    and the three ways must stay loaded side by side."""
    ways: dict[str, dict[str, Any]] = {
        "plain": {},
        "prompt_lookup": {"prompt_lookup": True},
        "draft model": {"draft_model": str(draft)},
    }
    rates: dict[tuple[str, str], list[float]] = {(way, p): [] for way in ways for p in PROMPTS}
    accepted: dict[tuple[str, str], list[float]] = {(way, p): [] for way in ways for p in PROMPTS if way != "plain"}
    draft_rates: list[float] = []
    with tempfile.TemporaryDirectory() as home:
        async with localllm.Engine(home, num_parallel=1, max_loaded_models=4) as engine:
            for way, options in ways.items():  # load and warm up
                await decode_rate(engine, str(targets[way]), "Hello", **options)
            await decode_rate(engine, str(draft), "Hello")
            runners = {
                "prompt_lookup": await runner_for(engine, prompt_lookup=True),
                "draft model": await runner_for(engine, draft_model_path=str(draft.resolve())),
            }
            for _ in range(ROUNDS):
                for name, prompt in PROMPTS.items():
                    for way, options in ways.items():
                        runner = runners.get(way)
                        before = (runner.drafted, runner.drafts_accepted) if runner else (0, 0)
                        rates[way, name].append(await decode_rate(engine, str(targets[way]), prompt, **options))
                        if runner is not None:
                            drafted, confirmed = runner.drafted - before[0], runner.drafts_accepted - before[1]
                            accepted[way, name].append(confirmed / drafted if drafted else 0.0)
                    draft_rates.append(await decode_rate(engine, str(draft), prompt))
    target_rate = statistics.median(rates["plain", "story"] + rates["plain", "copying"])
    draft_rate = statistics.median(draft_rates)
    print(
        f"draft model alone: {draft_rate:.1f} tokens/s against the target's {target_rate:.1f}: "
        f"a draft token costs {target_rate / draft_rate:.2f} of a target token"
    )
    print(f"\n{'prompt':8} {'way':14} {'tokens/s':>9} {'min':>7} {'max':>7} {'accepted':>9} {'vs plain':>9}")
    for name in PROMPTS:
        plain = statistics.median(rates["plain", name])
        for way in ways:
            values = rates[way, name]
            rate = f"{statistics.median(accepted[way, name]):9.0%}" if (way, name) in accepted else f"{'-':>9}"
            print(
                f"{name:8} {way:14} {statistics.median(values):9.1f} {min(values):7.1f} {max(values):7.1f} "
                f"{rate} {statistics.median(values) / plain:9.2f}"
            )


def main() -> None:
    draft = smollm2_path()
    print(
        f"machine: {os.cpu_count()} CPUs (affinity {len(os.sched_getaffinity(0))}); target SmolLM2 135M Q8_0 "
        f"(requantized), draft {draft.name}; greedy, {THREADS} threads, {NEW_TOKENS} new tokens, "
        f"median of {ROUNDS} alternating rounds"
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        target = requantize_q8_0(draft, Path(folder) / "smollm2-q8_0.gguf")
        targets = {"plain": target}
        for way in ("prompt_lookup", "draft model"):
            targets[way] = Path(folder) / f"smollm2-q8_0-{way.replace(' ', '-')}.gguf"
            shutil.copyfile(target, targets[way])
        anyio.run(bench, targets, draft)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
