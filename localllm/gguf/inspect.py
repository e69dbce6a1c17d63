"""Reading what a GGUF file says about its model: metadata, tensors, and the summary Ollama shows."""

from __future__ import annotations

import math
import os
import re
from typing import Any

import attrs
import numpy as np

from localllm.gguf.filetypes import file_type_name
from localllm.gguf.parser import open_gguf
from localllm.gguf.structure import KV, T_ARRAY, T_BOOL, T_FLOAT32, T_STRING, ParsedGGUF

__all__ = ["GGUFInfo", "TensorInfo", "file_type_name", "human_number", "read_info"]

# Float arrays up to this length get their float32 values shown at float32 precision (1e-05, not
# 9.999999747378752e-06), as scalars do; longer ones (token scores) are converted as they are, for speed.
_PRETTY_FLOAT_ARRAY_MAX = 1024

_LAYER = re.compile(r"blk\.(\d+)\.")


def human_number(n: int) -> str:
    """Ollama's `format.HumanNumber`: 134515008 -> "134.52M", 3212749824 -> "3.2B", 7000000000 -> "7B"."""
    if n >= 1_000_000_000:
        value = n / 1_000_000_000
        return f"{value:.0f}B" if value == math.floor(value) else f"{value:.1f}B"
    if n >= 1_000_000:
        value = n / 1_000_000
        return f"{value:.0f}M" if value == math.floor(value) else f"{value:.2f}M"
    if n >= 1_000:
        return f"{n / 1_000:.0f}K"
    return str(n)


@attrs.frozen
class TensorInfo:
    """One tensor of a GGUF file."""

    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the row length
    ggml_type: int  # numeric ggml type
    type_name: str  # "Q4_1", "F32", ...
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@attrs.frozen
class GGUFInfo:
    """What a GGUF file says about its model."""

    path: str
    version: int
    metadata: dict[str, Any]  # every key as plain Python values (arrays as lists, strings as str)
    tensors: tuple[TensorInfo, ...]
    architecture: str
    file_type: str
    parameter_count: int
    parameter_size: str
    context_length: int | None
    embedding_length: int | None
    block_count: int | None
    head_count: int | None
    head_count_kv: int | None
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    pooling_type: int | None

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value by key."""
        return self.metadata.get(key, default)

    def model_info(self, verbose: bool = False) -> dict[str, Any]:
        """The `model_info` of Ollama's show: every metadata key with its value.

        As in Ollama, `general.parameter_count` is added and `general.name` and `tokenizer.chat_template` are
        left out; without `verbose`, array values are replaced by None (Ollama's JSON null) unless empty.
        """
        info: dict[str, Any] = {}
        for key, value in self.metadata.items():
            if key in ("general.name", "tokenizer.chat_template"):
                continue
            if isinstance(value, list) and not verbose:
                info[key] = [] if not value else None
            elif isinstance(value, list):
                info[key] = list(value)
            else:
                info[key] = value
        info["general.parameter_count"] = self.parameter_count
        return dict(sorted(info.items()))

    def layer_bytes(self) -> dict[int, int]:
        """Bytes of the tensors of each repeating layer ("blk.N.*"), by layer number."""
        sizes: dict[int, int] = {}
        for tensor in self.tensors:
            match = _LAYER.match(tensor.name)
            if match:
                layer = int(match.group(1))
                sizes[layer] = sizes.get(layer, 0) + tensor.n_bytes
        return dict(sorted(sizes.items()))

    def output_bytes(self) -> int:
        """Bytes of the output head: output.* and output_norm.*, with token_embd.* standing in for a tied output."""
        groups: dict[str, int] = {}
        for tensor in self.tensors:
            group = tensor.name.split(".", 1)[0]
            groups[group] = groups.get(group, 0) + tensor.n_bytes
        head = groups.get("output", groups.get("token_embd", 0))
        return groups.get("output_norm", 0) + head

    def tensor_bytes(self) -> int:
        """Bytes of all tensor data."""
        return sum(t.n_bytes for t in self.tensors)

    def tensor(self, name: str) -> TensorInfo | None:
        """A tensor by name."""
        for tensor in self.tensors:
            if tensor.name == name:
                return tensor
        return None


def _float32(value: float) -> float:
    # The shortest decimal that reads back as the same float32: what the file's author wrote.
    return float(str(np.float32(value)))


def _plain(entry: KV) -> Any:
    value = entry.value
    if entry.type == T_STRING:
        return value.decode("utf-8", "replace")
    if entry.type == T_FLOAT32:
        return _float32(value)
    if entry.type != T_ARRAY:
        return value
    if entry.element_type == T_STRING:
        return [item.decode("utf-8", "replace") for item in value]
    if entry.element_type == T_FLOAT32 and len(value) <= _PRETTY_FLOAT_ARRAY_MAX:
        return [float(str(item)) for item in value]
    if entry.element_type == T_BOOL:
        return [bool(item) for item in value.tolist()]
    return value.tolist()


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, list):  # a per-layer value (head counts): the largest
        ints = [v for v in value if isinstance(v, int)]
        return max(ints) if ints else None
    return None


def _token(metadata: dict[str, Any], key: str) -> str | None:
    tokens = metadata.get("tokenizer.ggml.tokens")
    index = metadata.get(key)
    if not isinstance(tokens, list) or not isinstance(index, int) or isinstance(index, bool):
        return None
    if 0 <= index < len(tokens):
        token: str = tokens[index]
        return token
    return None


def info_from_parsed(parsed: ParsedGGUF) -> GGUFInfo:
    metadata = {key: _plain(entry) for key, entry in parsed.kv.items()}
    tensors = tuple(
        TensorInfo(
            name=t.name,
            shape=t.dims,
            ggml_type=t.ggml_type.value,
            type_name=t.ggml_type.name,
            offset=t.offset,
            n_bytes=t.n_bytes,
        )
        for t in parsed.tensors
    )
    parameter_count = sum(t.n_elements for t in parsed.tensors)
    arch_value = metadata.get("general.architecture")
    arch = arch_value if isinstance(arch_value, str) else "unknown"
    template = metadata.get("tokenizer.chat_template")
    pooling = metadata.get(f"{arch}.pooling_type")
    return GGUFInfo(
        path=parsed.name,
        version=parsed.version,
        metadata=metadata,
        tensors=tensors,
        architecture=arch,
        file_type=file_type_name(_int_or_none(metadata.get("general.file_type"))),
        parameter_count=parameter_count,
        parameter_size=human_number(parameter_count),
        context_length=_int_or_none(metadata.get(f"{arch}.context_length")),
        embedding_length=_int_or_none(metadata.get(f"{arch}.embedding_length")),
        block_count=_int_or_none(metadata.get(f"{arch}.block_count")),
        head_count=_int_or_none(metadata.get(f"{arch}.attention.head_count")),
        head_count_kv=_int_or_none(metadata.get(f"{arch}.attention.head_count_kv")),
        chat_template=template if isinstance(template, str) else None,
        bos_token=_token(metadata, "tokenizer.ggml.bos_token_id"),
        eos_token=_token(metadata, "tokenizer.ggml.eos_token_id"),
        pooling_type=_int_or_none(pooling) if not isinstance(pooling, list) else None,
    )


def read_info(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read the metadata and tensor descriptions of a GGUF file (the tensor data is not read).

    Meant for files `validate_file` has accepted; a malformed file raises `InvalidModelFile`.
    """
    with open_gguf(path) as parsed:
        return info_from_parsed(parsed)
