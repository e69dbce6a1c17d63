"""read_info and GGUFInfo on the two real test models and on small files written with the gguf package."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from localllm.errors import InvalidModelFile
from localllm.gguf import GGUFInfo, file_type_name, human_number, read_info

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> GGUFInfo:
    return read_info(smollm2_path)


@pytest.fixture(scope="module")
def gemma3(gemma3_path: Path) -> GGUFInfo:
    return read_info(gemma3_path)


def _layer_output_embd_total(info: GGUFInfo) -> int:
    """Bytes counted by layer_bytes + output_bytes, plus token_embd where output_bytes did not count it."""
    total = sum(info.layer_bytes().values()) + info.output_bytes()
    if info.tensor("output.weight") is not None:
        embd = info.tensor("token_embd.weight")
        total += embd.n_bytes if embd else 0
    return total


def test_smollm2_summary(smollm2: GGUFInfo, smollm2_path: Path) -> None:
    info = smollm2
    assert info.path == str(smollm2_path)
    assert info.version == 3
    assert info.architecture == "llama"
    assert info.file_type == "Q4_1"
    assert info.context_length == 8192
    assert info.embedding_length == 576
    assert info.block_count == 30
    assert info.head_count == 9
    assert info.head_count_kv == 3
    assert info.pooling_type is None
    assert info.chat_template is not None and "<|im_start|>" in info.chat_template
    assert info.bos_token == "<|im_start|>"
    assert info.eos_token == "<|im_end|>"
    assert info.parameter_count == 134_515_008
    assert info.parameter_size == "134.52M"  # what `ollama show` prints for smollm2:135m


def test_smollm2_metadata_and_tensors(smollm2: GGUFInfo) -> None:
    info = smollm2
    assert info.get("general.architecture") == "llama"
    assert info.get("no.such.key", 7) == 7
    assert info.get("llama.attention.layer_norm_rms_epsilon") == 1e-05  # float32 shown as written
    tokens = info.get("tokenizer.ggml.tokens")
    assert isinstance(tokens, list) and len(tokens) == 49152 and all(isinstance(t, str) for t in tokens[:10])
    assert info.get("general.languages") == ["en"]
    assert len(info.tensors) == 272
    embd = info.tensor("token_embd.weight")
    assert embd is not None
    assert embd.shape == (576, 49152)
    assert embd.type_name == "Q8_0" and embd.ggml_type == 8
    assert embd.n_bytes == 576 * 49152 // 32 * 34
    assert embd.offset % 32 == 0
    assert info.tensor("blk.0.attn_norm.weight") is not None
    assert info.tensor("nope") is None
    # Tensors lie inside the file, one after the other.
    ordered = sorted(info.tensors, key=lambda t: t.offset)
    assert ordered[-1].offset + ordered[-1].n_bytes <= Path(info.path).stat().st_size
    assert all(a.offset + a.n_bytes <= b.offset for a, b in itertools.pairwise(ordered))


def test_smollm2_layer_and_output_bytes(smollm2: GGUFInfo) -> None:
    info = smollm2
    layers = info.layer_bytes()
    assert sorted(layers) == list(range(30))
    assert len(set(layers.values())) == 1  # every SmolLM2 layer has the same tensors
    assert info.tensor("output.weight") is None  # tied embeddings: the token embedding is the output head
    embd = info.tensor("token_embd.weight")
    norm = info.tensor("output_norm.weight")
    assert embd is not None and norm is not None
    assert info.output_bytes() == embd.n_bytes + norm.n_bytes
    assert _layer_output_embd_total(info) == info.tensor_bytes()


def test_model_info_matches_ollama_show(smollm2: GGUFInfo) -> None:
    plain = smollm2.model_info()
    assert plain["general.architecture"] == "llama"
    assert plain["general.parameter_count"] == 134_515_008
    assert plain["llama.context_length"] == 8192
    assert "general.name" not in plain
    assert "tokenizer.chat_template" not in plain
    # Without verbose, Ollama sends arrays as null.
    assert plain["tokenizer.ggml.tokens"] is None
    assert plain["tokenizer.ggml.merges"] is None
    assert plain["general.languages"] is None
    verbose = smollm2.model_info(verbose=True)
    assert len(verbose["tokenizer.ggml.tokens"]) == 49152
    assert verbose["general.languages"] == ["en"]
    assert set(plain) == set(verbose)
    assert list(plain) == sorted(plain)
    # The info must not share lists with the metadata.
    verbose["general.languages"].append("xx")
    assert smollm2.get("general.languages") == ["en"]


def test_gemma3_summary(gemma3: GGUFInfo) -> None:
    info = gemma3
    assert info.architecture == "gemma3"
    assert info.file_type == "Q4_K_M"
    assert info.context_length == 32768
    assert info.embedding_length == 640
    assert info.block_count == 18
    assert info.head_count == 4
    assert info.head_count_kv == 1
    assert info.chat_template is None  # the base model carries no template
    assert info.bos_token == "<bos>"
    assert info.eos_token == "<eos>"
    assert info.parameter_size == "268.10M"
    assert len(info.get("tokenizer.ggml.tokens")) == 262144
    assert len(info.get("tokenizer.ggml.scores")) == 262144
    assert sorted(info.layer_bytes()) == list(range(18))
    assert _layer_output_embd_total(info) == info.tensor_bytes()
    assert {t.type_name for t in info.tensors} >= {"F32", "Q8_0", "Q4_K", "Q6_K"}


def test_gemma3_reads_fast(gemma3_path: Path) -> None:
    start = time.perf_counter()
    read_info(gemma3_path)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0"),
        (999, "999"),
        (1_000, "1K"),
        (22_600, "23K"),
        (1_000_000, "1M"),
        (134_515_008, "134.52M"),
        (268_098_176, "268.10M"),
        (3_212_749_824, "3.2B"),
        (7_000_000_000, "7B"),
        (70_553_706_496, "70.6B"),
    ],
)
def test_human_number(n: int, text: str) -> None:
    assert human_number(n) == text


def test_file_type_names() -> None:
    assert file_type_name(0) == "F32"
    assert file_type_name(1) == "F16"
    assert file_type_name(3) == "Q4_1"
    assert file_type_name(15) == "Q4_K_M"
    assert file_type_name(32) == "BF16"
    assert file_type_name(4) == "unknown"  # a retired type
    assert file_type_name(None) == "unknown"
    assert file_type_name(10_000) == "unknown"


def _write(path: Path, arch: str, fill: Callable[[gguf.GGUFWriter], None]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_values_of_every_type(tmp_path: Path) -> None:
    def fill(w: gguf.GGUFWriter) -> None:
        w.add_uint8("t.u8", 200)
        w.add_int8("t.i8", -5)
        w.add_uint16("t.u16", 65000)
        w.add_int16("t.i16", -300)
        w.add_uint32("t.u32", 4_000_000_000)
        w.add_int32("t.i32", -2_000_000)
        w.add_uint64("t.u64", 1 << 40)
        w.add_int64("t.i64", -(1 << 40))
        w.add_float32("t.f32", 0.1)
        w.add_float64("t.f64", 0.1)
        w.add_bool("t.bool", True)
        w.add_string("t.str", "héllo")
        w.add_array("t.arr_int", [1, 2, 3])
        w.add_array("t.arr_str", ["a", "bc"])
        w.add_array("t.arr_bool", [True, False])
        w.add_array("t.arr_f32", [0.5, 0.1])
        w.add_block_count(2)
        w.add_head_count([4, 8])  # per-layer head counts
        w.add_tensor("token_embd.weight", np.zeros((6, 32), dtype=np.float16))
        w.add_tensor("blk.0.w", np.zeros((2, 32), dtype=np.float32))
        w.add_tensor("blk.1.w", np.zeros((3, 32), dtype=np.float32))
        w.add_tensor("output.weight", np.zeros((6, 32), dtype=np.float32))

    info = read_info(_write(tmp_path / "t.gguf", "llama", fill))
    md = info.metadata
    assert (md["t.u8"], md["t.i8"], md["t.u16"], md["t.i16"]) == (200, -5, 65000, -300)
    assert (md["t.u32"], md["t.i32"], md["t.u64"], md["t.i64"]) == (4_000_000_000, -2_000_000, 1 << 40, -(1 << 40))
    assert md["t.f32"] == 0.1 and md["t.f64"] == 0.1
    assert md["t.bool"] is True
    assert md["t.str"] == "héllo"
    assert md["t.arr_int"] == [1, 2, 3]
    assert md["t.arr_str"] == ["a", "bc"]
    assert md["t.arr_bool"] == [True, False]
    assert md["t.arr_f32"] == [0.5, 0.1]
    assert info.model_info()["t.arr_int"] is None
    assert info.head_count == 8  # the largest per-layer value
    assert info.file_type == "unknown"  # no general.file_type
    assert info.chat_template is None and info.bos_token is None
    assert info.parameter_count == 6 * 32 + 2 * 32 + 3 * 32 + 6 * 32
    assert info.parameter_size == "544"
    assert info.layer_bytes() == {0: 2 * 32 * 4, 1: 3 * 32 * 4}
    assert info.output_bytes() == 6 * 32 * 4  # output.weight, not the F16 token_embd
    embd = info.tensor("token_embd.weight")
    assert embd is not None and embd.shape == (32, 6) and embd.type_name == "F16" and embd.n_bytes == 6 * 32 * 2


def test_model_info_keeps_empty_arrays() -> None:
    # Ollama's decoder keeps an empty array's values (JSON []) even when it leaves the others out (null).
    info = GGUFInfo(
        path="x.gguf",
        version=3,
        metadata={"general.architecture": "llama", "a.empty": [], "a.full": [1], "general.name": "x"},
        tensors=(),
        architecture="llama",
        file_type="unknown",
        parameter_count=0,
        parameter_size="0",
        context_length=None,
        embedding_length=None,
        block_count=None,
        head_count=None,
        head_count_kv=None,
        chat_template=None,
        bos_token=None,
        eos_token=None,
        pooling_type=None,
    )
    assert info.model_info() == {
        "a.empty": [],
        "a.full": None,
        "general.architecture": "llama",
        "general.parameter_count": 0,
    }
    assert info.model_info(verbose=True)["a.full"] == [1]


def test_read_info_rejects_a_non_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a model at all, just text" * 4)
    with pytest.raises(InvalidModelFile, match="not a GGUF file"):
        read_info(path)
