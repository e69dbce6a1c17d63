"""The GGUF format as the checks see it: value types, tensor types, and the structure a parse yields.

`parser.py` builds a `ParsedGGUF`; the semantic checks and `inspect.read_info` read it.
"""

from __future__ import annotations

import itertools
import mmap
import struct
from collections.abc import Iterator
from typing import Any

import attrs
from gguf.constants import GGML_QUANT_SIZES

__all__ = [
    "GGML_TYPES",
    "GGUF_MAGIC",
    "INTEGER_TYPES",
    "KV",
    "VALUE_TYPE_NAMES",
    "GGMLType",
    "ParsedGGUF",
    "RawTensor",
    "StringArray",
    "describe_type",
    "show_bytes",
]

GGUF_MAGIC = b"GGUF"

# What to do about a file that fails a check, by what is wrong with it.
HINT_CORRUPT = "The file is damaged or incomplete: re-download it, or re-create it from its source."
HINT_TOKENIZER = (
    "Its tokenizer metadata is inconsistent: re-create the file with a current GGUF converter, or re-download it."
)
HINT_ARCH = (
    "llama.cpp cannot run this model: use a model of a supported architecture, or re-create the file with a "
    "current GGUF converter."
)
HINT_HPARAMS = (
    "Its model metadata is inconsistent: re-create the file with a current GGUF converter, or re-download it."
)

# GGUF metadata value types.
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL = range(8)
T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = range(8, 13)

VALUE_TYPE_NAMES = {
    T_UINT8: "uint8",
    T_INT8: "int8",
    T_UINT16: "uint16",
    T_INT16: "int16",
    T_UINT32: "uint32",
    T_INT32: "int32",
    T_FLOAT32: "float32",
    T_BOOL: "bool",
    T_STRING: "string",
    T_ARRAY: "array",
    T_UINT64: "uint64",
    T_INT64: "int64",
    T_FLOAT64: "float64",
}
INTEGER_TYPES = frozenset({T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_UINT64, T_INT64})

_U64 = struct.Struct("<Q")


@attrs.frozen
class GGMLType:
    """A tensor data type: its ggml number, name, and block geometry."""

    value: int
    name: str
    block_size: int  # elements per block
    type_size: int  # bytes per block


def _ggml_types() -> dict[int, GGMLType]:
    types: dict[int, GGMLType] = {}
    for qtype, (block_size, type_size) in GGML_QUANT_SIZES.items():
        if block_size > 0 and type_size > 0:
            types[int(qtype)] = GGMLType(int(qtype), qtype.name, block_size, type_size)
    return types


GGML_TYPES: dict[int, GGMLType] = _ggml_types()


# What a parse reads: the file mapped into memory, or (part of) it as bytes.
Buffer = bytes | mmap.mmap


class StringArray:
    """A GGUF array of strings, read where the file holds it (a vocabulary can declare millions).

    The parser has checked every length before making one. Over a mapped file it can be read only while
    `open_gguf` keeps the file open.
    """

    __slots__ = ("_buf", "_count", "_start")

    def __init__(self, buf: Buffer, start: int, count: int) -> None:
        self._buf = buf
        self._start = start  # where the length of the first string is
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[bytes]:
        buf = self._buf
        pos = self._start
        unpack = _U64.unpack_from
        for _ in itertools.repeat(None, self._count):
            (length,) = unpack(buf, pos)
            start = pos + 8
            pos = start + length
            yield buf[start:pos]

    def __getitem__(self, index: int) -> bytes:
        """The string at `index`, found by walking the array (meant for messages, not for loops)."""
        if not 0 <= index < self._count:
            raise IndexError(index)
        return next(itertools.islice(self, index, None))


@attrs.frozen
class KV:
    """One metadata entry as parsed.

    `value` is an int, float, bool or bytes for scalars; for arrays it is a numpy array of numbers (bools as
    uint8) or a `StringArray`.
    """

    key: str
    type: int  # a T_* value; T_ARRAY for arrays
    element_type: int | None  # for arrays, the type of the elements
    value: Any
    offset: int  # where the entry starts in the file


@attrs.frozen
class RawTensor:
    name: str
    dims: tuple[int, ...]  # GGUF order: dims[0] is the row length
    ggml_type: GGMLType
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int
    n_elements: int
    info_offset: int  # where the tensor's description starts in the file


@attrs.frozen
class ParsedGGUF:
    name: str
    file_size: int
    version: int
    alignment: int
    data_offset: int  # absolute start of the tensor data section
    kv: dict[str, KV]
    tensors: tuple[RawTensor, ...]


def describe_type(entry: KV) -> str:
    if entry.type == T_ARRAY and entry.element_type is not None:
        return f"array of {VALUE_TYPE_NAMES.get(entry.element_type, '?')}"
    return VALUE_TYPE_NAMES.get(entry.type, "?")


def show_bytes(token: bytes) -> str:
    """Bytes from the file as a message shows them: printable, and cut to 60 characters."""
    text = repr(token.decode("utf-8", "backslashreplace"))
    return text if len(text) <= 60 else text[:57] + "..."
