"""One decode step of four sequences: inside the runner, and in a bare loop over the same llama.cpp objects.

Both sides load SmolLM2 135M Q4_1 through localllm's own backend with the same `LoadConfig` (2 threads, 4
slots x 2048, flash attention auto, weight repacking as localllm chooses), evaluate the same four prompts
and then decode 128 tokens each, greedily, one token per sequence per step. The runner side is an
`Engine` serving four concurrent requests; the bare side is a Python loop: a batch of four next tokens,
`llama_decode`, argmax of each row's logits. Rounds alternate; medians over every 4-token step.

- decode: the time inside `llama_decode` for a step of four tokens;
- gap: from the end of one such decode to the start of the next (sampling, sending text, building the batch);
- step: decode + gap; aggregate tokens/s follows from it;
- a request's time per token: each request's eval time over its tokens, which with four running is the step
  as a request sees it; measured the same way for runners in child processes (`isolation="process"`) and,
  where it is built, for llama-server (its own timings), run alone in its turn;
- event loop CPU: the share of one core the engine's event-loop thread used during the runner's run.

    nox -s bench -- benchmarks/bench_step.py
"""

from __future__ import annotations

import itertools
import os
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
from bench_server import NEW_TOKENS, NUM_CTX, PROMPTS, ROUNDS, SLOTS, THREADS  # the same run as llama-server's
from common import smollm2_path

import localllm
from localllm.runner import llama as llama_backend
from localllm.runner.protocol import LoadConfig
from localllm.runner.threads import in_a_passing_thread

Steps = list[tuple[int, float, float]]  # (tokens in the batch, start, end) of each decode


class Timed:
    """Records every decode of the contexts made while it is installed."""

    def __init__(self) -> None:
        self.steps: Steps = []
        self._original = llama_backend.LlamaContext.decode

    def __enter__(self) -> Timed:
        original, steps = self._original, self.steps

        def decode(context: Any, batch: Any) -> int:
            start = time.perf_counter()
            status = original(context, batch)
            steps.append((batch.n_tokens, start, time.perf_counter()))
            return int(status)

        llama_backend.LlamaContext.decode = decode  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        llama_backend.LlamaContext.decode = self._original  # type: ignore[method-assign]


def figures(steps: Steps) -> dict[str, float]:
    """Medians over the steps of four tokens, each step's gap measured to the decode after it."""
    decodes, gaps = [], []
    for (tokens, start, end), (_, next_start, _) in itertools.pairwise(steps):
        if tokens == SLOTS:
            decodes.append(end - start)
            gaps.append(next_start - end)
    decode, gap = statistics.median(decodes), statistics.median(gaps)
    return {"decode, ms": decode * 1e3, "gap, ms": gap * 1e3, "step, ms": (decode + gap) * 1e3,
            "aggregate, tokens/s": SLOTS / (decode + gap)}  # fmt: skip


def config() -> LoadConfig:
    return LoadConfig(str(smollm2_path()), num_ctx=NUM_CTX, num_parallel=SLOTS, num_thread=THREADS)


def bare_round(round_: int) -> dict[str, float]:
    # In a thread that ends with it: a thread that ran llama.cpp keeps its OpenMP team until it ends, and
    # one team too many slows every other (see localllm/runner/threads.py).
    return in_a_passing_thread(lambda: _bare_round(round_))


def _bare_round(round_: int) -> dict[str, float]:
    backend = llama_backend.LlamaBackend()
    load = config()
    model = backend.load_model(load, gpu_layers=0, tensor_split=None)
    context = backend.new_context(model, load)
    batch = backend.new_batch(context.n_batch, SLOTS)
    try:
        prompts = [model.tokenize(f"[{round_}] {p}", add_special=True, parse_special=True) for p in PROMPTS]
        with Timed() as timed:
            batch.clear()
            lasts = []
            for seq, prompt in enumerate(prompts):
                for pos, token in enumerate(prompt):
                    index = batch.add(token, pos, seq, pos == len(prompt) - 1)
                lasts.append(index)
            assert context.decode(batch) == 0
            tokens = [int(np.argmax(context.logits(i))) for i in lasts]
            positions = [len(p) for p in prompts]
            for _ in range(NEW_TOKENS - 1):
                batch.clear()
                for seq in range(SLOTS):
                    batch.add(tokens[seq], positions[seq], seq, True)
                    positions[seq] += 1
                assert context.decode(batch) == 0
                tokens = [int(np.argmax(context.logits(i))) for i in range(SLOTS)]
        return figures(timed.steps)
    finally:
        batch.close()
        context.close()
        model.close()


def _thread_seconds(ident: int | None) -> float:
    """CPU seconds a thread of this process has used (Linux)."""
    native = next((t.native_id for t in threading.enumerate() if t.ident == ident), None)
    try:
        fields = Path(f"/proc/self/task/{native}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runner_round(round_: int, isolation: str) -> dict[str, float]:
    async def run() -> dict[str, float]:
        options = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": NEW_TOKENS, "num_ctx": NUM_CTX,
                   "num_thread": THREADS}  # fmt: skip
        per_token: list[float] = []
        with tempfile.TemporaryDirectory() as home:
            async with localllm.Engine(home, num_parallel=SLOTS, isolation=isolation) as engine:
                await engine.generate(str(smollm2_path()), "Hello", raw=True, options={**options, "num_predict": 1})
                loop_thread = threading.get_ident()
                cpu, wall = _thread_seconds(loop_thread), time.perf_counter()

                async def one(prompt: str) -> None:
                    done = await engine.generate(str(smollm2_path()), f"[{round_}] {prompt}", raw=True, options=options)
                    per_token.append(done.eval_duration / done.eval_count / 1e6)

                with Timed() as timed:  # decodes in this process only: none with runner processes
                    async with anyio.create_task_group() as group:
                        for prompt in PROMPTS:
                            group.start_soon(one, prompt)
                share = (_thread_seconds(loop_thread) - cpu) / (time.perf_counter() - wall)
        result = figures(timed.steps) if timed.steps else {}
        return {**result, "a request's time per token, ms": statistics.median(per_token),
                "event loop CPU, share of a core": share}  # fmt: skip

    return anyio.run(run)


async def server_round(url: str, round_: int) -> dict[str, float]:
    """llama-server's time per token of each of the four requests (its own timings), the same step seen from
    a request."""
    body = {"n_predict": NEW_TOKENS, "temperature": 0, "repeat_penalty": 1.0, "cache_prompt": False}
    per_token: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one(prompt: str) -> None:
            response = await client.post("/completion", json={**body, "prompt": f"[{round_}] {prompt}"})
            per_token.append(response.json()["timings"]["predicted_per_token_ms"])

        async with anyio.create_task_group() as group:
            for prompt in PROMPTS:
                group.start_soon(one, prompt)
    return {"a request's time per token, ms": statistics.median(per_token)}


def main() -> None:
    from bench_server import DEFAULT_SERVER, start_server

    from localllm.runner.llama import repack_default

    repack = repack_default()
    print(
        f"SmolLM2 135M Q4_1; {THREADS} threads, {SLOTS} slots x {NUM_CTX}, {NEW_TOKENS} new tokens, greedy, flash "
        f"attention auto, repacking {'on' if repack else 'off'}; {ROUNDS} alternating rounds, medians"
    )
    binary = Path(os.environ.get("LLAMA_SERVER", DEFAULT_SERVER))
    server = start_server(binary, smollm2_path(), repack) if binary.is_file() else None
    if server is not None:
        server[0].send_signal(signal.SIGSTOP)
    columns: dict[str, list[dict[str, float]]] = {"bare loop": [], "runner": [], "runner process": []}
    if server is not None:
        columns["llama-server"] = []
    try:
        bare_round(-1)  # warm-up
        for round_ in range(ROUNDS):
            columns["bare loop"].append(bare_round(round_))
            columns["runner"].append(runner_round(round_, "thread"))
            columns["runner process"].append(runner_round(round_, "process"))
            if server is not None:  # stopped but for its turn: the others run alone
                process, url = server
                process.send_signal(signal.SIGCONT)
                columns["llama-server"].append(anyio.run(server_round, url, round_))
                process.send_signal(signal.SIGSTOP)
    finally:
        if server is not None:
            server[0].send_signal(signal.SIGCONT)
            server[0].terminate()
            server[0].wait()
    names = list(dict.fromkeys(name for rows in columns.values() for row in rows for name in row))
    print("\n" + f"{'':34}" + "".join(f"{column:>16}" for column in columns))
    for name in names:
        cells = []
        for rows in columns.values():
            values = [row[name] for row in rows if name in row]
            cells.append(f"{statistics.median(values):16.3f}" if values else f"{'':>16}")
        print(f"{name:34}" + "".join(cells))
    print("\nstep = decode + gap; a request's time per token is the step as each request saw it (its eval time).")


if __name__ == "__main__":
    main()
