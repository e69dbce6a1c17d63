"""validate_file: real files pass, hand-made files pass, crafted bad files fail with a clear message, and
truncated or bit-flipped copies of SmolLM2 are either rejected cleanly or safe to load."""

from __future__ import annotations

import math
import os
import random
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path
from typing import Any

import anyio
import attrs
import gguf
import numpy as np
import pytest

import localllm
from localllm.errors import InvalidModelFile
from localllm.gguf import is_gguf, read_info, validate_bytes, validate_file
from localllm.gguf.validate import open_gguf

# ---------------------------------------------------------------------------------------------------------------
# A tiny GGUF writer that can also write what GGUFWriter refuses to (wrong counts, types, offsets, ...).

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
GGML_F32, GGML_Q4_0 = 0, 2


def enc_str(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return enc_str(key) + struct.pack("<I", vtype) + payload


def kv_u32(key: str | bytes, value: int) -> bytes:
    return kv(key, U32, struct.pack("<I", value))


def kv_str(key: str, value: str | bytes) -> bytes:
    return kv(key, STR, enc_str(value))


def kv_strs(key: str, values: list[str] | list[bytes]) -> bytes:
    return kv(key, ARR, struct.pack("<IQ", STR, len(values)) + b"".join(enc_str(v) for v in values))


def kv_f32s(key: str, values: list[float]) -> bytes:
    return kv(key, ARR, struct.pack("<IQ", F32, len(values)) + struct.pack(f"<{len(values)}f", *values))


def kv_i32s(key: str, values: list[int]) -> bytes:
    return kv(key, ARR, struct.pack("<IQ", I32, len(values)) + struct.pack(f"<{len(values)}i", *values))


TOKENS = ["<unk>", "<s>", "</s>", "a", "b", "c"]


@attrs.define
class Tensor:
    name: str | bytes
    dims: tuple[int, ...]
    ggml_type: int = GGML_F32
    offset: int | None = None  # relative to the data section; None: laid out one after the other
    n_bytes: int | None = None  # bytes reserved in the data section; None: computed for F32/Q4_0


def default_tensors(n_vocab: int) -> list[Tensor]:
    return [
        Tensor("token_embd.weight", (8, n_vocab)),
        Tensor("blk.0.attn_norm.weight", (8,)),
        Tensor("output_norm.weight", (8,)),
    ]


def build(
    *,
    arch: str | None = "llama",
    tokens: list[str] | list[bytes] | None = None,
    tokenizer_model: str = "llama",
    extra: list[bytes] | None = None,
    replace: dict[str, bytes | None] | None = None,
    tensors: list[Tensor] | None = None,
    magic: bytes = b"GGUF",
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    alignment: int = 32,
    cut_data: int = 0,
) -> bytes:
    """A small, valid llama-architecture GGUF file, with whatever changes a test asks for."""
    tokens = list(TOKENS) if tokens is None else tokens
    entries: dict[str, bytes | None] = {
        "general.architecture": kv_str("general.architecture", arch) if arch is not None else None,
        "llama.context_length": kv_u32("llama.context_length", 64),
        "llama.embedding_length": kv_u32("llama.embedding_length", 8),
        "llama.block_count": kv_u32("llama.block_count", 1),
        "tokenizer.ggml.model": kv_str("tokenizer.ggml.model", tokenizer_model),
        "tokenizer.ggml.tokens": kv_strs("tokenizer.ggml.tokens", tokens),
        "tokenizer.ggml.scores": kv_f32s("tokenizer.ggml.scores", [0.0] * len(tokens)),
        "tokenizer.ggml.token_type": kv_i32s("tokenizer.ggml.token_type", [1] * len(tokens)),
        "tokenizer.ggml.bos_token_id": kv_u32("tokenizer.ggml.bos_token_id", 1),
        "tokenizer.ggml.eos_token_id": kv_u32("tokenizer.ggml.eos_token_id", 2),
    }
    entries.update(replace or {})
    blobs = [b for b in entries.values() if b is not None] + list(extra or [])
    tensor_list = default_tensors(len(tokens)) if tensors is None else tensors

    infos = b""
    cursor = 0
    data_end = 0
    for t in tensor_list:
        n_elements = math.prod(t.dims) if t.dims else 0
        size = t.n_bytes
        if size is None:
            size = n_elements * 4 if t.ggml_type == GGML_F32 else n_elements // 32 * 18
        offset = cursor if t.offset is None else t.offset
        infos += enc_str(t.name) + struct.pack("<I", len(t.dims)) + b"".join(struct.pack("<Q", d) for d in t.dims)
        infos += struct.pack("<IQ", t.ggml_type, offset)
        if offset + size < 1 << 24:  # far-away offsets are for tests of offsets past the end
            data_end = max(data_end, offset + size)
        cursor = -(-(offset + size) // alignment) * alignment
    header = magic + struct.pack("<I", version)
    header += struct.pack(
        "<QQ", len(tensor_list) if n_tensors is None else n_tensors, len(blobs) if n_kv is None else n_kv
    )
    body = header + b"".join(blobs) + infos
    padded = -(-len(body) // alignment) * alignment
    return body + bytes(padded - len(body)) + bytes(max(0, data_end - cut_data))


def write(tmp_path: Path, data: bytes, name: str = "model.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def rejects(tmp_path: Path, data: bytes, *fragments: str) -> str:
    """Assert that the file is rejected (from disk and from memory alike) and its message has every fragment."""
    path = write(tmp_path, data)
    with pytest.raises(InvalidModelFile) as caught:
        validate_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, message
    assert any(word in message for word in ("re-download", "re-create", "Use a")), message
    with pytest.raises(InvalidModelFile) as again:
        validate_bytes(data, name=str(path))
    assert str(again.value) == message
    return message


# ---------------------------------------------------------------------------------------------------------------
# Files that pass


@pytest.mark.fast
def test_real_models_pass_quickly(smollm2_path: Path, gemma3_path: Path) -> None:
    for path in (smollm2_path, gemma3_path):
        start = time.perf_counter()
        validate_file(path)
        assert time.perf_counter() - start < 2.0, path


@pytest.mark.fast
def test_is_gguf(tmp_path: Path, smollm2_path: Path) -> None:
    assert is_gguf(smollm2_path)
    assert not is_gguf(write(tmp_path, b"hello world"))
    assert not is_gguf(tmp_path / "missing.gguf")
    assert not is_gguf(tmp_path)  # a directory


@pytest.mark.fast
def test_tiny_handmade_model_passes(tmp_path: Path) -> None:
    data = build()
    validate_file(write(tmp_path, data))
    validate_bytes(data)
    info = read_info(tmp_path / "model.gguf")
    assert info.architecture == "llama"
    assert info.bos_token == "<s>" and info.eos_token == "</s>"
    assert [t.name for t in info.tensors] == ["token_embd.weight", "blk.0.attn_norm.weight", "output_norm.weight"]
    assert info.tensors[0].offset % 32 == 0


@pytest.mark.fast
def test_gguf_writer_models_pass(tmp_path: Path) -> None:
    for arch, model, tokens, types in [
        ("llama", "llama", ["<unk>", "<s>", "</s>", *[f"<0x{i:02X}>" for i in range(256)], "▁hi"], None),
        ("qwen2", "gpt2", ["a", "b", "ab", "<|endoftext|>"], None),
        ("bert", "bert", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello"], None),
        ("gemma3", "llama", ["<pad>", "<eos>", "<bos>", "<unk>", "x"], [3, 3, 3, 2, 1]),
    ]:
        path = tmp_path / f"{arch}.gguf"
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_context_length(128)
        writer.add_embedding_length(32)
        writer.add_block_count(1)
        writer.add_head_count(2)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
        writer.add_tokenizer_model(model)
        writer.add_token_list(tokens)
        writer.add_token_scores([0.0] * len(tokens))
        if types is None:
            types = [6 if t.startswith("<0x") else 1 for t in tokens]
        writer.add_token_types(types)
        if model == "gpt2":
            writer.add_token_merges(["a b"])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        if model == "bert":
            writer.add_sep_token_id(3)
        writer.add_chat_template("{{ messages }}")
        writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), dtype=np.float32))
        writer.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
        q4 = np.zeros((32, 18), dtype=np.uint8)  # 32 rows of one Q4_0 block each
        writer.add_tensor("blk.0.ffn_up.weight", q4, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        validate_file(path)
        info = read_info(path)
        assert info.file_type == "Q4_0"
        assert info.tensor("blk.0.ffn_up.weight").n_bytes == 32 * 18  # type: ignore[union-attr]


@pytest.mark.fast
def test_validate_bytes_of_a_header_prefix(smollm2_path: Path) -> None:
    size = smollm2_path.stat().st_size
    data_offset = read_info(smollm2_path).tensors[0].offset
    with open(smollm2_path, "rb") as handle:
        head = handle.read(data_offset)
    validate_bytes(head, name="smollm2", file_size=size)  # the tensor data is never read
    with pytest.raises(InvalidModelFile, match="beyond the first 1000 bytes"):
        validate_bytes(head[:1000], name="smollm2", file_size=size)
    with pytest.raises(InvalidModelFile, match="runs past the end of the file"):
        validate_bytes(head, name="smollm2", file_size=size - 1)


@pytest.mark.fast
def test_files_that_cannot_be_memory_mapped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, smollm2_path: Path
) -> None:
    import localllm.gguf.parser as parser_module

    def no_mmap(*args: Any, **kwargs: Any) -> Any:
        raise OSError("mmap not supported here")

    monkeypatch.setattr(parser_module.mmap, "mmap", no_mmap)
    monkeypatch.setattr(parser_module, "_FIRST_READ", 4096)  # the header needs several larger reads
    validate_file(smollm2_path)
    assert read_info(smollm2_path).block_count == 30
    rejects(tmp_path, build(version=7), "unsupported GGUF version 7")
    rejects(tmp_path, build(cut_data=10), "runs past the end of the file")


# ---------------------------------------------------------------------------------------------------------------
# Files that fail: the header


@pytest.mark.fast
def test_missing_empty_and_tiny_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFile, match="cannot read the file"):
        validate_file(tmp_path / "missing.gguf")
    with pytest.raises(InvalidModelFile, match="cannot read the file"):
        validate_file(tmp_path)
    rejects(tmp_path, b"", "0 bytes long")
    rejects(tmp_path, b"GGUF\x03\x00\x00\x00", "8 bytes long")


@pytest.mark.fast
def test_bad_magic(tmp_path: Path) -> None:
    rejects(tmp_path, build(magic=b"GGML"), "not a GGUF file", "b'GGML'")
    rejects(tmp_path, b"PK\x03\x04" + build()[4:], "not a GGUF file")


@pytest.mark.fast
def test_bad_version(tmp_path: Path) -> None:
    rejects(tmp_path, build(version=1), "GGUF version 1 is no longer supported")
    rejects(tmp_path, build(version=4), "unsupported GGUF version 4")
    rejects(tmp_path, build(version=0), "unsupported GGUF version 0")
    rejects(tmp_path, build(version=3 << 24), "big-endian")


@pytest.mark.fast
def test_implausible_counts(tmp_path: Path) -> None:
    rejects(tmp_path, build(n_kv=1 << 60), f"claims {1 << 60} metadata entries")
    rejects(tmp_path, build(n_kv=(1 << 64) - 1), "metadata entries")
    rejects(tmp_path, build(n_tensors=1 << 40), f"claims {1 << 40} tensors")
    rejects(tmp_path, build(n_kv=12), "metadata entry 11")  # two more entries than there are
    rejects(tmp_path, build(n_tensors=4), "tensor 3", "has an empty name")  # reads into the padding


# ---------------------------------------------------------------------------------------------------------------
# Files that fail: metadata


@pytest.mark.fast
def test_huge_string_length(tmp_path: Path) -> None:
    bad_key = struct.pack("<Q", 1 << 62) + b"general.x"
    rejects(tmp_path, build(extra=[bad_key]), "key of metadata entry 10", f"claims a length of {1 << 62} bytes")
    bad_value = kv("general.x", STR, struct.pack("<Q", 5_000_000) + b"abc")
    rejects(tmp_path, build(extra=[bad_value]), "the value of metadata key 'general.x'", "claims a length of 5000000")
    bad_token = kv("tokenizer.ggml.tokens", ARR, struct.pack("<IQ", STR, 2) + enc_str("a") + struct.pack("<Q", 1 << 50))
    rejects(
        tmp_path,
        build(replace={"tokenizer.ggml.tokens": bad_token}),
        "element 1 of metadata key 'tokenizer.ggml.tokens'",
    )


@pytest.mark.fast
def test_bad_value_types(tmp_path: Path) -> None:
    rejects(
        tmp_path, build(extra=[kv("general.x", 13, b"\0" * 8)]), "metadata key 'general.x'", "unknown value type 13"
    )
    rejects(tmp_path, build(extra=[kv("general.x", 1 << 31, b"")]), "unknown value type 2147483648")
    nested = kv("general.x", ARR, struct.pack("<IQ", ARR, 1) + struct.pack("<IQ", U8, 1) + b"\1")
    rejects(tmp_path, build(extra=[nested]), "'general.x' is an array of arrays")
    rejects(tmp_path, build(extra=[kv("general.x", ARR, struct.pack("<IQ", 99, 0))]), "unknown element type 99")
    rejects(tmp_path, build(extra=[kv("general.x", BOOL, b"\x02")]), "invalid byte value 2")
    bools = kv("general.x", ARR, struct.pack("<IQ", BOOL, 3) + b"\x01\x00\x07")
    rejects(tmp_path, build(extra=[bools]), "element 2 is a bool with the invalid byte value 7")


@pytest.mark.fast
def test_huge_array_lengths(tmp_path: Path) -> None:
    numbers = kv("general.x", ARR, struct.pack("<IQ", U64, 1 << 40))
    rejects(tmp_path, build(extra=[numbers]), f"'general.x' claims {1 << 40} array elements")
    numbers = kv("general.x", ARR, struct.pack("<IQ", U64, 1 << 20))
    rejects(tmp_path, build(extra=[numbers]), "claims 1048576 uint64 elements (8388608 bytes)")
    strings = kv("general.x", ARR, struct.pack("<IQ", STR, 1 << 29))
    rejects(tmp_path, build(extra=[strings]), f"claims {1 << 29} strings")


@pytest.mark.fast
def test_declared_counts_beyond_the_file_are_refused_before_allocating(tmp_path: Path) -> None:
    """A count is compared with the bytes left in the file before anything is allocated for it."""
    for array, message in [
        (struct.pack("<IQ", STR, 1 << 29), f"claims {1 << 29} strings"),  # needs 8 bytes each
        (struct.pack("<IQ", U64, 1 << 27), "claims 134217728 uint64 elements"),
        (struct.pack("<IQ", U8, 1 << 30), "claims 1073741824 uint8 elements"),
    ]:
        path = write(tmp_path, build(extra=[kv("general.x", ARR, array)]))
        tracemalloc.start()
        try:
            with pytest.raises(InvalidModelFile, match=message):
                validate_file(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, (message, peak)
    head = build(n_kv=1 << 40)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidModelFile, match="metadata entries"):
            validate_bytes(head)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_by_the_metadata_present(tmp_path: Path) -> None:
    """Two million empty tokens take 16 MB of zero lengths: left as a hole, the file is sparse. llama.cpp names
    them [EMPTY_<id>]; the validator checks them without holding a name, a list entry or a hash for each."""
    n_tokens = 2_000_000
    lengths = struct.pack("<IQ", STR, n_tokens)
    vocabulary = {
        "tokenizer.ggml.tokens": kv("tokenizer.ggml.tokens", ARR, lengths + bytes(8 * n_tokens)),
        "tokenizer.ggml.scores": None,
        "tokenizer.ggml.token_type": None,
    }
    data = build(replace=vocabulary)
    hole = data.index(lengths) + len(lengths)
    path = tmp_path / "sparse.gguf"
    with open(path, "wb") as out:
        out.write(data[:hole])
        out.seek(hole + 8 * n_tokens)
        out.write(data[hole + 8 * n_tokens :])
    del data
    tracemalloc.start()
    try:
        validate_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # the file holds 16 MB of metadata; the tokens as a list of bytes took 200 MB


@pytest.mark.fast
def test_bad_keys(tmp_path: Path) -> None:
    rejects(tmp_path, build(extra=[kv_u32("llama.block_count", 2)]), "metadata key 'llama.block_count' appears twice")
    rejects(tmp_path, build(extra=[kv_u32("", 2)]), "metadata entry 10", "has an empty key")
    rejects(tmp_path, build(extra=[kv_u32(b"a\0b", 2)]), "contains a NUL byte")
    rejects(tmp_path, build(extra=[kv_u32(b"\xff\xfe", 2)]), "is not valid UTF-8")


@pytest.mark.fast
def test_bad_alignment(tmp_path: Path) -> None:
    rejects(tmp_path, build(extra=[kv_u32("general.alignment", 24)]), "'general.alignment' is 24, which is not a power")
    rejects(tmp_path, build(extra=[kv_u32("general.alignment", 0)]), "'general.alignment' is 0")
    wrong = kv("general.alignment", U64, struct.pack("<Q", 32))
    rejects(tmp_path, build(extra=[wrong]), "'general.alignment' must be a uint32, but is a uint64")
    validate_bytes(build(extra=[kv_u32("general.alignment", 64)], alignment=64))


# ---------------------------------------------------------------------------------------------------------------
# Files that fail: tensors


@pytest.mark.fast
def test_tensor_offset_past_the_end(tmp_path: Path) -> None:
    norm = read_info(write(tmp_path, build(), "good.gguf")).tensor("output_norm.weight")
    assert norm is not None
    data = build(cut_data=10)
    message = rejects(tmp_path, data)
    assert message.startswith(
        f"{tmp_path / 'model.gguf'}: tensor 'output_norm.weight' data (offset {norm.offset}, 32 bytes) runs past "
        f"the end of the file (size {len(data)}). "
    ), message
    far = default_tensors(6)
    far[2].offset = 1 << 62
    rejects(tmp_path, build(tensors=far), "tensor 'output_norm.weight' data", "runs past the end of the file")


@pytest.mark.fast
def test_tensor_alignment_and_overlap(tmp_path: Path) -> None:
    shifted = default_tensors(6)
    shifted[1].offset = 8 * 6 * 4 + 4
    rejects(tmp_path, build(tensors=shifted), "tensor 'blk.0.attn_norm.weight' data", "is not aligned to 32 bytes")
    overlapping = default_tensors(6)
    overlapping[2].offset = 64  # inside token_embd.weight
    rejects(
        tmp_path,
        build(tensors=overlapping),
        "tensor 'output_norm.weight' data (offset",
        "overlaps tensor 'token_embd.weight'",
    )


@pytest.mark.fast
def test_bad_tensor_shapes_and_types(tmp_path: Path) -> None:
    def with_last(tensor: Tensor) -> bytes:
        return build(tensors=[*default_tensors(6)[:2], tensor])

    rejects(tmp_path, with_last(Tensor("output_norm.weight", (), n_bytes=4)), "has 0 dimensions; it must have 1 to 4")
    rejects(tmp_path, with_last(Tensor("output_norm.weight", (1, 1, 1, 1, 8))), "has 5 dimensions")
    rejects(tmp_path, with_last(Tensor("output_norm.weight", (8, 0))), "dimension 1 of size 0")
    rejects(tmp_path, with_last(Tensor("output_norm.weight", (1 << 32, 1 << 32), n_bytes=0)), "too many elements")
    rejects(tmp_path, with_last(Tensor("output_norm.weight", (8,), ggml_type=99)), "unknown ggml type 99")
    rejects(tmp_path, with_last(Tensor("output_norm.weight", (8,), ggml_type=31)), "unknown ggml type 31")  # retired
    rejects(
        tmp_path,
        with_last(Tensor("output_norm.weight", (20, 2), ggml_type=GGML_Q4_0, n_bytes=64)),
        "rows of 20 elements, not a multiple of the block size 32 of its type Q4_0",
    )
    validate_bytes(with_last(Tensor("output_norm.weight", (64, 2), ggml_type=GGML_Q4_0)))


@pytest.mark.fast
def test_bad_tensor_names(tmp_path: Path) -> None:
    twice = [*default_tensors(6), Tensor("output_norm.weight", (8,))]
    rejects(tmp_path, build(tensors=twice), "tensor 'output_norm.weight' is described twice")
    long_name = "blk.0." + "x" * 58
    rejects(
        tmp_path,
        build(tensors=[*default_tensors(6), Tensor(long_name, (8,))]),
        "is 64 bytes long; llama.cpp allows at most 63",
    )
    validate_bytes(build(tensors=[*default_tensors(6), Tensor(long_name[:-1], (8,))]))
    rejects(tmp_path, build(tensors=[*default_tensors(6), Tensor("", (8,))]), "tensor 3", "has an empty name")
    rejects(tmp_path, build(tensors=[*default_tensors(6), Tensor(b"a\0b", (8,))]), "contains a NUL byte")


@pytest.mark.fast
def test_missing_tensors(tmp_path: Path) -> None:
    rejects(
        tmp_path, build(tensors=default_tensors(6)[1:]), "tensor 'token_embd.weight', which every 'llama' model needs"
    )
    rejects(tmp_path, build(tensors=[]), "holds no tensors")
    lora = [Tensor("blk.0.attn_q.weight.lora_a", (8, 4)), Tensor("blk.0.attn_q.weight.lora_b", (4, 8))]
    adapter = [kv_str("general.type", "adapter"), kv_str("adapter.type", "lora")]
    no_vocab = {"tokenizer.ggml.tokens": None, "tokenizer.ggml.scores": None, "tokenizer.ggml.token_type": None}
    no_vocab |= {"tokenizer.ggml.model": None, "tokenizer.ggml.bos_token_id": None, "tokenizer.ggml.eos_token_id": None}
    validate_bytes(build(tensors=lora, extra=adapter, replace=no_vocab))
    rejects(tmp_path, build(tensors=lora, replace=no_vocab), "tensor 'token_embd.weight'")
    # A projector needs no token embedding, but it does need the keys libmtmd reads (see the projector tests).
    projector = {"general.architecture": kv_str("general.architecture", "clip"), **no_vocab}
    rejects(
        tmp_path,
        build(arch=None, tensors=[Tensor("v.blk.0.attn_q.weight", (8, 8))], replace=projector),
        "'clip.projector_type'",
    )


# ---------------------------------------------------------------------------------------------------------------
# Files that fail: architecture and hyperparameters


@pytest.mark.fast
def test_architecture(tmp_path: Path) -> None:
    rejects(tmp_path, build(arch="llama9"), "unknown model architecture 'llama9'", "supported architecture")
    rejects(tmp_path, build(arch=None), "'general.architecture' is missing")
    as_int = kv_u32("general.architecture", 1)
    rejects(tmp_path, build(arch=None, extra=[as_int]), "'general.architecture' must be a string, but is a uint32")
    for arch in ("llama", "gemma", "gemma2", "gemma3", "qwen2", "qwen3", "phi3", "bert", "nomic-bert", "mistral3"):
        validate_bytes(build(arch=arch, tokenizer_model="gpt2" if "qwen" in arch else "llama"))


@pytest.mark.fast
def test_hyperparameters(tmp_path: Path) -> None:
    rejects(
        tmp_path, build(replace={"llama.block_count": kv_u32("llama.block_count", 600)}), "'llama.block_count' is 600"
    )
    as_str = kv_str("llama.context_length", "big")
    rejects(tmp_path, build(replace={"llama.context_length": as_str}), "'llama.context_length' must be an integer")
    experts = [kv_u32("llama.expert_count", 8), kv_u32("llama.expert_used_count", 9)]
    rejects(tmp_path, build(extra=experts), "'llama.expert_used_count' is 9 with llama.expert_count 8")
    rejects(tmp_path, build(extra=[kv_u32("llama.expert_used_count", 2)]), "'llama.expert_used_count' is 2")
    rejects(tmp_path, build(extra=[kv_u32("llama.expert_count", 4)]), "'llama.expert_used_count' is 0")
    rejects(
        tmp_path, build(extra=[kv_u32("llama.expert_count", 4096), kv_u32("llama.expert_used_count", 2)]), "is 4096"
    )
    validate_bytes(build(extra=[kv_u32("llama.expert_count", 8), kv_u32("llama.expert_used_count", 2)]))
    huge = kv("llama.context_length", U64, struct.pack("<Q", 1 << 31))
    rejects(tmp_path, build(replace={"llama.context_length": huge}), "'llama.context_length' is 2147483648")
    rejects(tmp_path, build(extra=[kv_u32("tokenizer.chat_template", 1)]), "'tokenizer.chat_template' must be a string")
    rejects(tmp_path, build(extra=[kv_str("general.file_type", "Q4")]), "'general.file_type' must be an integer")


# ---------------------------------------------------------------------------------------------------------------
# Files that fail: tokenizer


@pytest.mark.fast
def test_duplicate_tokens(tmp_path: Path) -> None:
    rejects(
        tmp_path,
        build(tokens=["<unk>", "<s>", "</s>", "a", "b", "a"]),
        "has the token 'a' twice (ids 3 and 5)",
        "tokenizer",
    )
    # llama.cpp reads token strings up to the first NUL, so these collide too.
    rejects(tmp_path, build(tokens=["<unk>", "<s>", "</s>", "a", "b", b"a\0zz"]), "token 'a' twice (ids 3 and 5)")
    rejects(tmp_path, build(tokens=["<unk>", "<s>", "</s>", "a", "", "[EMPTY_4]"]), "'[EMPTY_4]' twice (ids 4 and 5)")
    spelled = build(tokens=["<unk>", "<s>", "</s>", "[EMPTY_5]", "b", "\0x"])
    rejects(tmp_path, spelled, "'[EMPTY_5]' twice (ids 3 and 5)")
    validate_bytes(build(tokens=["<unk>", "<s>", "</s>", "a", "", ""]))  # empty ones get distinct names
    validate_bytes(build(tokens=["<unk>", "<s>", "</s>", "[EMPTY_3]", "[EMPTY_05]", ""]))  # no empty token 3 or 05
    many = [f"t{i}" for i in range(5000)]
    rejects(tmp_path, build(tokens=[*many, "t4321"], tensors=default_tensors(5001)), "'t4321' twice (ids 4321 and")


@pytest.mark.fast
def test_special_token_ids(tmp_path: Path) -> None:
    bos = kv_u32("tokenizer.ggml.bos_token_id", 6)
    rejects(
        tmp_path,
        build(replace={"tokenizer.ggml.bos_token_id": bos}),
        "tokenizer.ggml.bos_token_id is 6, outside the vocabulary of 6 tokens",
    )
    pad = kv("tokenizer.ggml.padding_token_id", I32, struct.pack("<i", -1))
    rejects(tmp_path, build(extra=[pad]), "tokenizer.ggml.padding_token_id is -1")
    eos = kv_str("tokenizer.ggml.eos_token_id", "</s>")
    rejects(
        tmp_path,
        build(replace={"tokenizer.ggml.eos_token_id": eos}),
        "'tokenizer.ggml.eos_token_id' must be an integer",
    )
    validate_bytes(
        build(extra=[kv_u32("tokenizer.ggml.unknown_token_id", 0), kv_u32("tokenizer.ggml.eot_token_id", 5)])
    )


@pytest.mark.fast
def test_tokens_the_tokenizer_adds_must_exist(tmp_path: Path) -> None:
    """llama.cpp asserts that the BOS/EOS/SEP token it adds to a prompt exists: an id the file names, else the
    tokenizer's default id, which must then lie inside the vocabulary."""
    no_ids: dict[str, bytes | None] = {"tokenizer.ggml.bos_token_id": None, "tokenizer.ggml.eos_token_id": None}

    def one_token(*extra: bytes) -> bytes:
        return build(tokens=["a"], tensors=default_tensors(1), replace=no_ids, extra=list(extra))

    rejects(
        tmp_path,
        one_token(),
        "the 'llama' tokenizer adds a BOS token to every prompt, but tokenizer.ggml.bos_token_id is missing",
        "default id is 1, outside the vocabulary of 1 tokens",
    )
    validate_bytes(one_token(kv_u32("tokenizer.ggml.bos_token_id", 0)))
    validate_bytes(one_token(kv("tokenizer.ggml.add_bos_token", BOOL, b"\0")))
    as_int = kv_u32("tokenizer.ggml.add_bos_token", 1)
    rejects(tmp_path, one_token(as_int), "'tokenizer.ggml.add_bos_token' must be a bool")
    t5_bos = kv("tokenizer.ggml.add_bos_token", BOOL, b"\1")
    rejects(
        tmp_path,
        build(tokenizer_model="t5", replace=no_ids, extra=[t5_bos]),
        "the 't5' tokenizer adds a BOS token",
        "its default id is none",
    )
    validate_bytes(build(tokenizer_model="t5", replace=no_ids))  # it adds EOS, default id 1
    gpt2_eos = kv("tokenizer.ggml.add_eos_token", BOOL, b"\1")
    rejects(
        tmp_path,
        build(tokenizer_model="gpt2", replace=no_ids, extra=[gpt2_eos]),
        "the 'gpt2' tokenizer adds a EOS token",
        "its default id is 11, outside the vocabulary of 6 tokens",
    )
    bert = build(arch="bert", tokenizer_model="bert")
    rejects(tmp_path, bert, "the 'bert' tokenizer adds a SEP token", "tokenizer.ggml.seperator_token_id is missing")
    validate_bytes(build(arch="bert", tokenizer_model="bert", extra=[kv_u32("tokenizer.ggml.seperator_token_id", 2)]))


@pytest.mark.fast
def test_types_llama_cpp_asserts(tmp_path: Path) -> None:
    """llama.cpp reads these keys of a LoRA adapter with getters that abort on any other type."""
    rejects(tmp_path, build(extra=[kv_str("adapter.lora.alpha", "8")]), "'adapter.lora.alpha' must be a float32")
    rejects(tmp_path, build(extra=[kv_u32("adapter.type", 1)]), "'adapter.type' must be a string, but is a uint32")
    rejects(tmp_path, build(extra=[kv_u32("general.type", 1)]), "'general.type' must be a string")
    alpha = kv("adapter.lora.alpha", F32, struct.pack("<f", 8.0))
    validate_bytes(build(extra=[alpha, kv_str("adapter.type", "lora"), kv_str("general.type", "model")]))


@pytest.mark.fast
def test_mismatched_tokenizer_arrays(tmp_path: Path) -> None:
    scores = kv_f32s("tokenizer.ggml.scores", [0.0] * 5)
    rejects(
        tmp_path,
        build(replace={"tokenizer.ggml.scores": scores}),
        "tokenizer.ggml.scores has 5 entries but tokenizer.ggml.tokens has 6",
    )
    types = kv_i32s("tokenizer.ggml.token_type", [1] * 7)
    rejects(tmp_path, build(replace={"tokenizer.ggml.token_type": types}), "token_type has 7 entries")
    as_strings = kv_strs("tokenizer.ggml.scores", ["0"] * 6)
    rejects(
        tmp_path,
        build(replace={"tokenizer.ggml.scores": as_strings}),
        "'tokenizer.ggml.scores' must be an array of float32, but is a array of string",
    )
    as_ints = kv_i32s("tokenizer.ggml.tokens", [1] * 6)
    rejects(
        tmp_path,
        build(replace={"tokenizer.ggml.tokens": as_ints}),
        "'tokenizer.ggml.tokens' must be an array of string",
    )
    merges = kv_i32s("tokenizer.ggml.merges", [1])
    rejects(tmp_path, build(extra=[merges]), "'tokenizer.ggml.merges' must be an array of string")
    rejects(
        tmp_path,
        build(tokens=[], tensors=[Tensor("token_embd.weight", (8, 1))]),
        "the vocabulary (tokenizer.ggml.tokens) is empty",
    )
    no_tokens = {"tokenizer.ggml.tokens": None, "tokenizer.ggml.scores": None, "tokenizer.ggml.token_type": None}
    rejects(tmp_path, build(replace=no_tokens), "tokenizer.ggml.model is 'llama' but the vocabulary")


@pytest.mark.fast
def test_byte_tokens(tmp_path: Path) -> None:
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tokens = ["<unk>", "<s>", "</s>", *byte_tokens]
    types = kv_i32s("tokenizer.ggml.token_type", [3, 3, 3] + [6] * 256)
    validate_bytes(build(tokens=tokens, replace={"tokenizer.ggml.token_type": types}))
    broken = ["<unk>", "<s>", "</s>", *byte_tokens[:65], "<0xZZ>", *byte_tokens[66:]]
    rejects(tmp_path, build(tokens=broken, replace={"tokenizer.ggml.token_type": types}), "byte token 68 is '<0xZZ>'")
    missing = ["<unk>", "<s>", "</s>", *byte_tokens[:65], "z", *byte_tokens[66:]]
    plain = kv_i32s("tokenizer.ggml.token_type", [1] * len(missing))
    rejects(
        tmp_path, build(tokens=missing, replace={"tokenizer.ggml.token_type": plain}), "lacks the byte token <0x41>"
    )
    # The raw byte itself can stand in for its <0xNN> token, as llama.cpp falls back to it.
    validate_bytes(build(tokens=[*missing[:68], "A", *missing[69:]], replace={"tokenizer.ggml.token_type": plain}))
    bert_types = kv_i32s("tokenizer.ggml.token_type", [1, 1, 1, 1, 6, 1])
    rejects(
        tmp_path,
        build(arch="bert", tokenizer_model="bert", replace={"tokenizer.ggml.token_type": bert_types}),
        "token 4 ('b') has the byte type",
    )


@pytest.mark.fast
def test_precompiled_charsmap(tmp_path: Path) -> None:
    def charsmap(blob: bytes) -> bytes:
        return kv("tokenizer.ggml.precompiled_charsmap", ARR, struct.pack("<IQ", U8, len(blob)) + blob)

    validate_bytes(build(tokenizer_model="t5", extra=[charsmap(struct.pack("<I", 4) + b"abcdefgh")]))
    rejects(
        tmp_path,
        build(tokenizer_model="t5", extra=[charsmap(struct.pack("<I", 400) + b"abc")]),
        "precompiled_charsmap is shorter",
    )


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing with the real SmolLM2 file

FLIPS_FIRST_MB = 500
FLIPS_TENSOR_INFO = 100
TRUNCATIONS_HEADER = 160
TRUNCATIONS_DATA = 60
# Each accepted mutant costs a model load; a handful shows the point (accepted files load without crashing).
MAX_MUTANTS_LOADED = 5


@attrs.frozen
class FlipOutcome:
    accepted: list[tuple[int, int]]  # (offset, xor mask) of mutants validate_bytes accepted
    rejected: int


@pytest.fixture(scope="module")
def smollm2_layout(smollm2_path: Path) -> dict[str, int]:
    with open_gguf(smollm2_path) as parsed:
        last = max(parsed.tensors, key=lambda t: t.offset)
    return {
        "size": parsed.file_size,
        "data_offset": parsed.data_offset,
        "data_end": last.offset + last.n_bytes,
        "tensor_info_start": parsed.tensors[0].info_offset,
    }


@pytest.fixture(scope="module")
def flip_outcome(smollm2_path: Path, smollm2_layout: dict[str, int]) -> FlipOutcome:
    """Single-bit flips validated from memory: only the header is copied per mutant, the tensor data is not read."""
    size = smollm2_layout["size"]
    with open(smollm2_path, "rb") as handle:
        head = bytearray(handle.read(smollm2_layout["data_offset"]))
    rng = random.Random(20240601)
    flips = [(rng.randrange(1 << 20), 1 << rng.randrange(8)) for _ in range(FLIPS_FIRST_MB)]
    start = smollm2_layout["tensor_info_start"]
    flips += [(rng.randrange(start, len(head)), 1 << rng.randrange(8)) for _ in range(FLIPS_TENSOR_INFO)]
    accepted: list[tuple[int, int]] = []
    rejected = 0
    for offset, mask in flips:
        head[offset] ^= mask
        try:
            validate_bytes(head, name="mutant.gguf", file_size=size)
        except InvalidModelFile as exc:
            assert str(exc).startswith("mutant.gguf: ")
            rejected += 1
        else:
            accepted.append((offset, mask))
        finally:
            head[offset] ^= mask
    return FlipOutcome(accepted, rejected)


@pytest.mark.fast
def test_layout_assumptions(smollm2_layout: dict[str, int]) -> None:
    assert 1 << 20 < smollm2_layout["tensor_info_start"] < smollm2_layout["data_offset"]  # the first MB is metadata
    assert smollm2_layout["data_end"] == smollm2_layout["size"]  # no trailing bytes: every truncation cuts data


@pytest.mark.slow
def test_truncated_copies_are_rejected(tmp_path: Path, smollm2_path: Path, smollm2_layout: dict[str, int]) -> None:
    size, data_offset = smollm2_layout["size"], smollm2_layout["data_offset"]
    rng = random.Random(7)
    cuts = set(range(0, 64)) | {data_offset - 1, data_offset, data_offset + 1, size - 1}
    cuts |= {rng.randrange(64, data_offset) for _ in range(TRUNCATIONS_HEADER)}
    cuts |= {rng.randrange(data_offset, size) for _ in range(TRUNCATIONS_DATA)}
    assert len(cuts) >= 200
    copy = tmp_path / "truncated.gguf"
    shutil.copyfile(smollm2_path, copy)
    for cut in sorted(cuts, reverse=True):  # shrinking one copy in place: no file is written twice
        os.truncate(copy, cut)
        with pytest.raises(InvalidModelFile) as caught:
            validate_file(copy)
        message = str(caught.value)
        assert message.startswith(f"{copy}: "), message
        assert any(f in message for f in (f"(size {cut})", f"only {cut} bytes long", f"a file of {cut} bytes")), message


@pytest.mark.slow
def test_bit_flips_are_rejected_or_accepted_cleanly(flip_outcome: FlipOutcome) -> None:
    assert len(flip_outcome.accepted) + flip_outcome.rejected == FLIPS_FIRST_MB + FLIPS_TENSOR_INFO
    # Most flips in the first megabyte land in token strings and token types, which stay valid.
    assert flip_outcome.rejected > 0 and flip_outcome.accepted


_LOAD_MUTANTS = textwrap.dedent(
    """
    import sys

    import anyio

    import localllm
    from localllm.errors import LocalLLMError


    async def main(home: str, paths: list[str]) -> None:
        async with localllm.Engine(home=home) as engine:
            for path in paths:
                try:
                    reply = await engine.generate(path, "Hello", options={"num_predict": 4, "temperature": 0})
                except LocalLLMError as exc:
                    print("REFUSED", path, type(exc).__name__, exc, flush=True)
                else:
                    assert reply.done, reply
                    print("GENERATED", path, repr(reply.response), flush=True)


    anyio.run(main, sys.argv[1], sys.argv[2:])
    """
)


@pytest.mark.slow
def test_accepted_mutants_load_and_generate(tmp_path: Path, smollm2_path: Path, flip_outcome: FlipOutcome) -> None:
    """What validation lets through must never crash llama.cpp: each accepted mutant loads and generates, or is
    refused with a LocalLLMError. The engine runs in a child process so that an abort() inside llama.cpp shows up
    here as a failure naming the mutant, instead of killing the test run."""
    original = smollm2_path.read_bytes()
    paths: list[str] = []
    for offset, mask in flip_outcome.accepted[:MAX_MUTANTS_LOADED]:
        data = bytearray(original)
        data[offset] ^= mask
        path = tmp_path / f"mutant-{offset}-{mask}.gguf"
        path.write_bytes(data)
        paths.append(str(path))
    assert paths
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_MUTANTS, str(home), *paths],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report: dict[str, Any] = {"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr[-4000:]}
    assert result.returncode == 0, report
    lines = result.stdout.splitlines()
    for path in paths:
        assert any(line.split(" ", 2)[1:2] == [path] for line in lines), (path, report)


def _not_a_regular_file(kind: str, tmp_path: Path) -> str:
    if kind == "device":
        return "/dev/zero"  # reads without end: before, the check read it until memory ran out
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)  # blocks a reader until someone writes: before, the load hung
    return str(fifo)


@pytest.mark.parametrize("kind", ["device", "fifo"])
async def test_a_model_path_that_is_not_a_regular_file_is_refused(
    kind: str, home: Path, smollm2_path: Path, tmp_path: Path
) -> None:
    path = _not_a_regular_file(kind, tmp_path)
    async with localllm.Engine(home) as engine:
        with anyio.fail_after(60):  # a hang detector: each refusal comes at once
            with pytest.raises(localllm.InvalidModelFile, match="not a regular file"):
                await engine.generate(path, "hi")
            with pytest.raises(localllm.InvalidModelFile, match="not a regular file"):
                await engine.create("bad", from_=path)
            with pytest.raises(localllm.InvalidModelFile, match="not a regular file"):
                await engine.generate(str(smollm2_path), "hi", options={"draft_model": path, "num_predict": 1})
        assert (await engine.list()).models == []


# ---------------------------------------------------------------------------------------------------------------
# Multimodal projectors: the keys libmtmd reads with getters that abort the process on a wrong type

_GOOD_PROJECTOR: dict[str, tuple[str, Any]] = {
    "general.type": ("str", "mmproj"),
    "clip.projector_type": ("str", "mlp"),
    "clip.has_vision_encoder": ("bool", True),
    "clip.vision.image_size": ("u32", 32),
    "clip.vision.patch_size": ("u32", 8),
    "clip.vision.embedding_length": ("u32", 32),
    "clip.vision.feed_forward_length": ("u32", 64),
    "clip.vision.block_count": ("u32", 2),
    "clip.vision.projection_dim": ("u32", 576),
    "clip.vision.attention.head_count": ("u32", 2),
    "clip.vision.attention.layer_norm_epsilon": ("f32", 1e-5),
    "clip.vision.image_mean": ("f32s", [0.5, 0.5, 0.5]),
    "clip.vision.image_std": ("f32s", [0.5, 0.5, 0.5]),
}


def write_projector(tmp_path: Path, **changes: tuple[str, Any] | None) -> Path:
    """A projector's metadata (and one tensor), with keys (dots as '__') replaced, or dropped when None."""
    keys = dict(_GOOD_PROJECTOR)
    for name, change in changes.items():
        key = name.replace("__", ".")
        if change is None:
            keys.pop(key, None)
        else:
            keys[key] = change
    path = tmp_path / f"mmproj-{len(list(tmp_path.iterdir()))}.gguf"
    writer = gguf.GGUFWriter(str(path), "clip")
    for key, (kind, value) in keys.items():
        if kind == "str":
            writer.add_string(key, value)
        elif kind == "bool":
            writer.add_bool(key, value)
        elif kind == "u32":
            writer.add_uint32(key, value)
        elif kind == "i32":
            writer.add_int32(key, value)
        elif kind == "f32":
            writer.add_float32(key, value)
        else:
            writer.add_array(key, value)
    writer.add_tensor("mm.2.weight", np.zeros((576, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def rejects_projector(tmp_path: Path, *fragments: str, **changes: tuple[str, Any] | None) -> None:
    path = write_projector(tmp_path, **changes)
    with pytest.raises(InvalidModelFile) as caught:
        validate_file(path)
    message = str(caught.value)
    for fragment in ("projector", "re-create it with a current llama.cpp converter", *fragments):
        assert fragment in message, message


@pytest.mark.fast
def test_a_sound_projector_passes(tmp_path: Path, projector_path: Path) -> None:
    validate_file(write_projector(tmp_path))
    validate_file(projector_path)  # the one libmtmd loads in the engine tests
    audio = {
        "clip__has_vision_encoder": None,
        "clip__has_audio_encoder": ("bool", True),
        **{f"clip__audio__{k}": ("u32", 64) for k in ("embedding_length", "feed_forward_length", "projection_dim")},
        "clip__audio__block_count": ("u32", 2),
        "clip__audio__attention__head_count": ("u32", 4),
        "clip__audio__attention__layer_norm_epsilon": ("f32", 1e-5),
        "clip__audio__num_mel_bins": ("u32", 128),
    }
    validate_file(write_projector(tmp_path, **audio))  # an audio encoder needs no image geometry


@pytest.mark.fast
@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"clip__vision__patch_size": ("str", "14")}, ("'clip.vision.patch_size' must be a uint32, but is a string",)),
        ({"clip__vision__image_size": ("i32", 32)}, ("'clip.vision.image_size' must be a uint32, but is a int32",)),
        ({"clip__vision__block_count": ("i32", 2)}, ("'clip.vision.block_count' must be a uint32",)),
        ({"clip__projector_type": None}, ("'clip.projector_type'", "is missing")),
        ({"clip__projector_type": ("u32", 1)}, ("'clip.projector_type' must be a string",)),
        ({"clip__has_vision_encoder": ("str", "yes")}, ("'clip.has_vision_encoder' must be a bool",)),
        ({"clip__has_vision_encoder": ("bool", False)}, ("neither a vision nor an audio encoder",)),
        ({"clip__vision__attention__head_count": None}, ("'clip.vision.attention.head_count' is missing",)),
        ({"clip__vision__attention__head_count": ("u32", 0)}, ("'clip.vision.attention.head_count' is 0",)),
        ({"clip__vision__patch_size": ("u32", 0)}, ("'clip.vision.patch_size' is 0",)),
        ({"clip__vision__image_size": ("u32", 4)}, ("image size (4, clip.vision.image_size) is smaller than",)),
        ({"clip__vision__image_size": ("u32", 100_000)}, ("'clip.vision.image_size' is 100000 (at most 8192)",)),
        ({"clip__vision__block_count": ("u32", 100_000)}, ("'clip.vision.block_count' is 100000",)),
        ({"clip__vision__attention__layer_norm_epsilon": ("u32", 1)}, ("layer_norm_epsilon' must be a float32",)),
        ({"clip__vision__image_mean": ("f32s", [0.5])}, ("'clip.vision.image_mean' must be an array of at least 3",)),
        ({"clip__vision__image_std": ("str", "0.5")}, ("'clip.vision.image_std' must be an array",)),
        ({"clip__has_audio_encoder": ("bool", True)}, ("'clip.audio.embedding_length' is missing",)),
    ],
)
def test_a_projector_libmtmd_would_abort_on_is_refused(
    tmp_path: Path, changes: dict[str, tuple[str, Any] | None], fragments: tuple[str, ...]
) -> None:
    """A projector is refused with the key named, before libmtmd's typed reads could abort the process."""
    rejects_projector(tmp_path, *fragments, **changes)
