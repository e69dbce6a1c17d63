"""Quantizing with llama.cpp's quantizer, directly and through `create(..., quantize=...)`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import localllm
from localllm.errors import ConversionError, InvalidRequest
from localllm.gguf import read_info
from localllm.gguf.convert import convert_hf_to_gguf
from localllm.registry import Registry
from localllm.runner.quantize import QUANTIZATION_TYPES, quantization_type, quantize_gguf

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_hf_to_gguf(DATA / "tiny_llama", tmp_path_factory.mktemp("tiny") / "tiny-f16.gguf")


def test_names() -> None:
    assert quantization_type("q4_k_m") == "Q4_K_M"
    assert quantization_type("Q8_0") == "Q8_0"
    assert {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q3_K_M", "Q4_K_S", "Q5_K_M", "Q6_K"} <= set(QUANTIZATION_TYPES)
    with pytest.raises(InvalidRequest, match=r"q9_9.*valid types are: .*q8_0.*q4_K_M"):
        quantization_type("q9_9")


@pytest.mark.parametrize("kind", ["q8_0", "q4_K_M"])
async def test_quantized_model_generates(tmp_path: Path, tiny_f16: Path, home: Path, kind: str) -> None:
    events: list[dict[str, Any]] = []
    folder = tmp_path / "out"
    out = quantize_gguf(tiny_f16, folder / f"tiny-{kind}.gguf", ftype_name=kind, nthread=2, progress=events.append)
    assert read_info(out).file_type == quantization_type(kind)
    assert out.stat().st_size < tiny_f16.stat().st_size
    status = f"quantizing F16 model to {quantization_type(kind)}"
    assert events[0] == {"status": status, "total": events[0]["total"], "completed": 0}
    assert events[-1] == {"status": status, "total": out.stat().st_size, "completed": out.stat().st_size}
    assert [p.name for p in folder.iterdir()] == [out.name]  # no temporary file left behind

    async with localllm.Engine(home) as engine:
        response = await engine.generate(str(out), "Hello", options={"num_predict": 4, "temperature": 0})
    assert response.done
    assert response.eval_count is not None and 1 <= response.eval_count <= 4


def test_refuses_quantized_sources_and_bad_paths(tmp_path: Path, smollm2_path: Path) -> None:
    with pytest.raises(ConversionError, match="only F32, F16 and BF16"):
        quantize_gguf(smollm2_path, tmp_path / "x.gguf", ftype_name="q4_0")
    with pytest.raises(ConversionError, match="no such model file"):
        quantize_gguf(tmp_path / "missing.gguf", tmp_path / "x.gguf")
    with pytest.raises(InvalidRequest):
        quantize_gguf(smollm2_path, tmp_path / "x.gguf", ftype_name="q7")
    assert list(tmp_path.iterdir()) == []


async def test_quantized_minilm_still_embeds(tmp_path: Path, minilm_dir: Path, home: Path) -> None:
    reference = json.loads((DATA / "minilm_reference.json").read_text())
    f16 = convert_hf_to_gguf(minilm_dir, tmp_path / "minilm-f16.gguf")
    q8 = quantize_gguf(f16, tmp_path / "minilm-q8_0.gguf", ftype_name="q8_0", nthread=2)
    async with localllm.Engine(home) as engine:
        response = await engine.embed(str(q8), reference["sentences"])
    got, expected = np.array(response.embeddings), np.array(reference["embeddings"])
    assert np.sum(got * expected, axis=1).min() >= 0.99


def test_create_converts_and_quantizes(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "models", quantizer=quantize_gguf)
    events: list[dict[str, Any]] = []
    registry.create("tiny", from_=DATA / "tiny_llama", quantize="q8_0", progress=events.append)
    statuses = [e["status"] for e in events]
    assert statuses[0] == "converting model"
    assert "quantizing F16 model to Q8_0" in statuses
    assert statuses.index("quantizing F16 model to Q8_0") > statuses.index("parsing GGUF")
    assert statuses[-2:] == ["writing manifest", "success"]
    shown = registry.show("tiny")
    assert shown.details.quantization_level == "Q8_0"
    assert "<|im_start|>" in shown.template
    # Only the blobs of the model are left: no converted or quantized scratch files.
    assert all(p.name.startswith("sha256-") for p in registry.store.blobs_dir.iterdir())

    # A stored F16 model can be quantized into a new one; a quantized one cannot be again.
    registry.create("tiny-f16", modelfile=f"FROM {DATA / 'tiny_llama'}\nPARAMETER temperature 0.1\n")
    assert registry.show("tiny-f16").details.quantization_level == "F16"
    registry.create("tiny-q4", from_="tiny-f16", quantize="Q4_K_M")
    shown = registry.show("tiny-q4")
    assert shown.details.quantization_level == "Q4_K_M"
    assert "temperature" in shown.parameters
    with pytest.raises(InvalidRequest, match="only supported for F32, F16 and BF16"):
        registry.create("again", from_="tiny", quantize="q4_0")
    with pytest.raises(InvalidRequest, match="unknown quantization type"):
        registry.create("bad", from_="tiny-f16", quantize="q3")


def test_modelfile_from_relative_folder(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(DATA / "tiny_qwen2", tmp_path / "hf-model")
    (tmp_path / "Modelfile").write_text("FROM ./hf-model\nSYSTEM Be brief.\n")
    registry = Registry(tmp_path / "models", quantizer=quantize_gguf)
    registry.create("qwen-tiny", modelfile=tmp_path / "Modelfile")
    shown = registry.show("qwen-tiny")
    assert shown.details.family == "qwen2"
    assert shown.system == "Be brief."
    (tmp_path / "empty").mkdir()
    with pytest.raises(localllm.InvalidModelFile, match="not a Hugging Face model"):
        registry.create("nothing", from_=tmp_path / "empty")
