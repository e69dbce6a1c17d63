"""Hugging Face folder -> GGUF: metadata, tokenizers, and logits against transformers' own.

The tiny models and their reference logits come from tests/data/make_tiny_models.py
(random weights, real BPE tokenizers); MiniLM is the real all-MiniLM-L6-v2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from localllm.errors import ConversionError
from localllm.gguf import read_info
from localllm.gguf.convert import convert_hf_to_gguf, is_hf_model_dir

DATA = Path(__file__).parent / "data"
TINY = {"llama": DATA / "tiny_llama", "qwen2": DATA / "tiny_qwen2"}
# Largest |llama.cpp - transformers| logit allowed, by output type (logits span about +-2.5).
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "bf16": 5e-2}


def llama_logits(path: Path, prompts: list[dict[str, Any]]) -> list[tuple[np.ndarray, list[int]]]:
    """Per prompt: the logits of every position, computed by llama.cpp in full precision (F32 KV cache,
    no flash attention), and llama.cpp's own tokenization of the prompt's text."""
    import llama_cpp

    from localllm.runner.llama import Batch, LlamaContext, LlamaModel

    model = LlamaModel(str(path))
    context = LlamaContext(model, n_ctx=64, n_batch=64, n_seq_max=1, n_threads=2, type_k=0, type_v=0, flash_attn=False)
    batch = Batch(64, 1)
    results = []
    try:
        for prompt in prompts:
            context.clear()
            batch.clear()
            ids = prompt["token_ids"]
            for pos, token in enumerate(ids):
                batch.add(token, pos, 0, True)
            assert context.decode(batch) == 0
            rows = [
                np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context.handle, i), shape=(model.n_vocab,)).copy()
                for i in range(len(ids))
            ]
            results.append((np.array(rows), model.tokenize(prompt["prompt"], add_special=False)))
        return results
    finally:
        batch.close()
        context.close()
        model.close()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16"])
def test_logits_match_transformers(tmp_path: Path, family: str, out_type: str) -> None:
    reference = json.loads((TINY[family] / "reference.json").read_text())
    path = convert_hf_to_gguf(TINY[family], tmp_path / "tiny.gguf", out_type=out_type)
    worst = 0.0
    for prompt, (logits, tokens) in zip(reference["prompts"], llama_logits(path, reference["prompts"]), strict=True):
        # llama.cpp's tokenizer (vocabulary, merges, pre-tokenizer) splits the text exactly as Hugging Face's does
        assert tokens == prompt["token_ids"]
        worst = max(worst, float(np.abs(logits - np.array(prompt["logits"])).max()))
    assert worst < TOLERANCE[out_type], f"{family} {out_type}: max |diff| {worst:.2e}"


def test_llama_metadata(tmp_path: Path) -> None:
    path = convert_hf_to_gguf(TINY["llama"], tmp_path / "tiny.gguf", out_type="f16")
    info = read_info(path)
    meta = info.metadata
    assert info.architecture == "llama"
    assert info.file_type == "F16"
    assert meta["llama.attention.head_count"] == 4
    assert meta["llama.attention.head_count_kv"] == 2  # grouped-query attention
    assert meta["llama.rope.dimension_count"] == 16
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert len(meta["tokenizer.ggml.merges"]) > 100
    assert meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert info.chat_template is not None and "<|im_start|>" in info.chat_template  # carried over from the model folder
    names = {t.name for t in info.tensors}
    assert "output.weight" not in names  # tied embeddings: llama.cpp reuses token_embd
    types = {t.name: t.type_name for t in info.tensors}
    assert types["blk.0.attn_q.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_qwen2_metadata(tmp_path: Path) -> None:
    info = read_info(convert_hf_to_gguf(TINY["qwen2"], tmp_path / "q.gguf", out_type="bf16"))
    assert info.architecture == "qwen2"
    assert info.file_type == "BF16"
    assert info.metadata["tokenizer.ggml.pre"] == "qwen2"
    names = {t.name for t in info.tensors}
    assert {"output.weight", "blk.1.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"} <= names


def test_bert_metadata(tmp_path: Path, minilm_dir: Path) -> None:
    assert is_hf_model_dir(minilm_dir)
    events: list[dict[str, Any]] = []
    info = read_info(convert_hf_to_gguf(minilm_dir, tmp_path / "m.gguf", progress=events.append))
    meta = info.metadata
    assert info.architecture == "bert"
    assert info.pooling_type == 1  # mean, from 1_Pooling/config.json
    assert meta["bert.attention.causal"] is False
    assert meta["tokenizer.ggml.model"] == "bert"
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 30522
    assert tokens[101] == "[CLS]" and tokens[2003] == "\u2581is"  # word starts carry the phantom space
    assert events[0]["completed"] == 0 and events[-1]["completed"] == events[-1]["total"] > 80_000_000
    types = {t.name: t.type_name for t in info.tensors}
    assert types["token_embd.weight"] == "F16" and types["position_embd.weight"] == "F32"


# --------------------------------------------------------------------------- failures


def copy_tiny(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(TINY["llama"], folder)
    return folder


def edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def drop_tensor(folder: Path, name: str) -> None:
    """Rewrite model.safetensors without one tensor (the header is plain JSON, easy to edit)."""
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    del header[name]
    body = json.dumps(header).encode()
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + length :])


def assert_nothing_written(folder: Path) -> None:
    assert [p.name for p in folder.iterdir()] == []


def test_unknown_architecture(tmp_path: Path) -> None:
    folder = copy_tiny(tmp_path)
    edit_config(folder, architectures=["GPT2LMHeadModel"])
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="GPT2LMHeadModel"):
        convert_hf_to_gguf(folder, out / "x.gguf")
    assert not out.exists() or not any(out.iterdir())


def test_missing_tensor(tmp_path: Path) -> None:
    folder = copy_tiny(tmp_path)
    drop_tensor(folder, "model.layers.1.mlp.up_proj.weight")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        convert_hf_to_gguf(folder, out / "x.gguf")
    assert_nothing_written(out)


def test_shape_mismatch(tmp_path: Path) -> None:
    folder = copy_tiny(tmp_path)
    edit_config(folder, intermediate_size=96)
    with pytest.raises(ConversionError, match=r"gate_proj\.weight.*\[128, 64\].*\[96, 64\]"):
        convert_hf_to_gguf(folder, tmp_path / "x.gguf")


def test_failure_while_writing_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from localllm.gguf import convert

    calls = {"n": 0}
    real = convert._out_data

    def flaky(item: Any, out_type: str) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(item, out_type)

    monkeypatch.setattr(convert, "_out_data", flaky)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OSError, match="disk full"):
        convert_hf_to_gguf(TINY["llama"], out / "x.gguf")
    assert_nothing_written(out)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="out_type"):
        convert_hf_to_gguf(TINY["llama"], tmp_path / "x.gguf", out_type="q4_0")
    with pytest.raises(ConversionError, match="not a folder"):
        convert_hf_to_gguf(tmp_path / "nothing", tmp_path / "x.gguf")
    with pytest.raises(ConversionError, match=r"config\.json"):
        convert_hf_to_gguf(tmp_path, tmp_path / "x.gguf")


def test_peak_memory_stays_below_model_size(tmp_path: Path, minilm_dir: Path) -> None:
    """Tensors are streamed: converting MiniLM (91 MB of F32) grows the process by well under the model's size."""
    script = textwrap.dedent(
        f"""
        import re
        from localllm.gguf.convert import convert_hf_to_gguf

        def status(key):
            text = open("/proc/self/status").read()
            return int(re.search(key + r":\\s+(\\d+)", text).group(1)) * 1024

        before = status("VmRSS")
        convert_hf_to_gguf({str(minilm_dir)!r}, {str(tmp_path / "m.gguf")!r}, out_type="f16")
        print(before, status("VmHWM"))
        """
    )
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the peak resident size")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=os.environ)
    before, peak = (int(x) for x in done.stdout.split())
    model_size = (minilm_dir / "model.safetensors").stat().st_size
    assert peak - before < 0.9 * model_size, (
        f"grew by {(peak - before) / 1e6:.0f} MB for a {model_size / 1e6:.0f} MB model"
    )


# --------------------------------------------------------------------------- other layouts


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A minimal safetensors writer: a JSON header of dtypes, shapes and offsets, then the raw bytes."""
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
    header: dict[str, Any] = {}
    offset = 0
    for name, array in tensors.items():
        header[name] = {
            "dtype": names[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    with open(path, "wb") as f:
        f.write(len(body).to_bytes(8, "little") + body)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


def test_sharded_weights(tmp_path: Path) -> None:
    from localllm.gguf.convert import _Weights

    folder = copy_tiny(tmp_path)
    weights = _Weights(folder)
    names = weights.names()
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        write_safetensors(folder / file, {n: np.array(weights.load(n)) for n in part})
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {n: file for file, part in shards.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    reference = json.loads((folder / "reference.json").read_text())
    path = convert_hf_to_gguf(folder, tmp_path / "sharded.gguf", out_type="f32")
    (logits, _tokens), *_ = llama_logits(path, reference["prompts"][:1])
    assert float(np.abs(logits - np.array(reference["prompts"][0]["logits"])).max()) < TOLERANCE["f32"]


def test_bert_from_vocab_txt(tmp_path: Path, minilm_dir: Path) -> None:
    """Without tokenizer.json, the WordPiece vocabulary comes from vocab.txt and tokenizer_config.json."""
    folder = tmp_path / "minilm"
    folder.mkdir()
    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "modules.json", "model.safetensors"):
        (folder / name).symlink_to(minilm_dir / name)
    (folder / "1_Pooling").symlink_to(minilm_dir / "1_Pooling")
    from_txt = read_info(convert_hf_to_gguf(folder, tmp_path / "txt.gguf"))
    from_json = read_info(convert_hf_to_gguf(minilm_dir, tmp_path / "json.gguf"))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.unknown_token_id"):
        assert from_txt.metadata[key] == from_json.metadata[key], key


def test_llama3_rope_scaling(tmp_path: Path) -> None:
    folder = copy_tiny(tmp_path)
    scaling = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    edit_config(folder, rope_parameters=scaling)
    path = convert_hf_to_gguf(folder, tmp_path / "scaled.gguf")
    tensor = read_info(path).tensor("rope_freqs.weight")
    assert tensor is not None and tensor.shape == (8,) and tensor.type_name == "F32"
    llama_logits(path, [{"prompt": "hi", "token_ids": [5, 6, 7]}])  # llama.cpp loads and runs it

    edit_config(folder, rope_parameters={**scaling, "rope_type": "yarn"})
    with pytest.raises(ConversionError, match="yarn"):
        convert_hf_to_gguf(folder, tmp_path / "yarn.gguf")
