"""A defensive GGUF parser: every file is checked here before llama.cpp sees it.

llama.cpp aborts the whole process on many malformed files (failed asserts, out-of-range reads), so nothing
that could reach one of those paths may pass. The parser below never trusts a count or a length before
comparing it with the bytes that are left, never allocates from an unchecked count, does not recurse (GGUF
arrays of arrays are refused, as llama.cpp refuses them), and turns every problem into `InvalidModelFile`
with a message that names what is wrong, where, and what to do about it.

`validate_file` runs the structural parse and then the semantic checks (architecture, tokenizer, a few
hyperparameters llama.cpp asserts on). `inspect.read_info` reuses the structural parse only.

Memory stays proportional to the metadata actually present, never to a declared count: string arrays (the
vocabulary, merges) are not copied out of the mapped file but read in place while it is open (`open_gguf`),
and duplicate tokens are found from one 8-byte hash per token.

`validate_once` remembers each verdict for one version of a file (device, inode, size, mtime), so a model
resolved for every request is read once.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import itertools
import mmap
import os
import re
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any, NoReturn, TypeVar

import attrs
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS

from localllm.errors import InvalidModelFile
from localllm.files import open_regular

__all__ = [
    "GGUF_MAGIC",
    "StringArray",
    "is_gguf",
    "open_gguf",
    "remember_sha256",
    "sha256_once",
    "validate_bytes",
    "validate_file",
    "validate_once",
]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Limits llama.cpp itself applies (gguf.cpp, ggml.h, llama-hparams.h).
MAX_STRING_LENGTH = 1 << 30
MAX_ARRAY_ELEMENTS = 1 << 30
MAX_TENSOR_NAME = 63  # GGML_MAX_NAME is 64, including the terminating NUL
MAX_DIMS = 4
MAX_LAYERS = 512
MAX_EXPERTS = 512
_INT64_MAX = (1 << 63) - 1
_INT32_MAX = (1 << 31) - 1

_HEADER_SIZE = 4 + 4 + 8 + 8
_FIRST_READ = 8 << 20  # where a file cannot be memory-mapped, the prefix read first (then 4x larger)
# The smallest encodings, used to bound counts by the bytes that are left.
_MIN_KV_SIZE = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR_INFO_SIZE = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset

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
_SCALAR_STRUCTS = {
    T_UINT8: struct.Struct("<B"),
    T_INT8: struct.Struct("<b"),
    T_UINT16: struct.Struct("<H"),
    T_INT16: struct.Struct("<h"),
    T_UINT32: struct.Struct("<I"),
    T_INT32: struct.Struct("<i"),
    T_FLOAT32: struct.Struct("<f"),
    T_BOOL: struct.Struct("<B"),
    T_UINT64: struct.Struct("<Q"),
    T_INT64: struct.Struct("<q"),
    T_FLOAT64: struct.Struct("<d"),
}
_NUMPY_DTYPES: dict[int, np.dtype[Any]] = {
    T_UINT8: np.dtype("<u1"),
    T_INT8: np.dtype("<i1"),
    T_UINT16: np.dtype("<u2"),
    T_INT16: np.dtype("<i2"),
    T_UINT32: np.dtype("<u4"),
    T_INT32: np.dtype("<i4"),
    T_FLOAT32: np.dtype("<f4"),
    T_BOOL: np.dtype("<u1"),
    T_UINT64: np.dtype("<u8"),
    T_INT64: np.dtype("<i8"),
    T_FLOAT64: np.dtype("<f8"),
}
INTEGER_TYPES = frozenset({T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_UINT64, T_INT64})

_U32 = struct.Struct("<I")
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

# The architecture names llama.cpp knows, as the gguf package (maintained with llama.cpp) lists them.
KNOWN_ARCHITECTURES: frozenset[str] = frozenset(MODEL_ARCH_NAMES.values())
# Architectures whose graph starts from a token embedding: their files must carry token_embd.weight.
_ARCHS_WITH_TOKEN_EMBD: frozenset[str] = frozenset(
    name for arch, name in MODEL_ARCH_NAMES.items() if MODEL_TENSOR.TOKEN_EMBD in MODEL_TENSORS.get(arch, ())
)

# token_type values (llama.cpp's llama_token_type).
TOKEN_TYPE_BYTE = 6
_BYTE_TOKEN = re.compile(rb"<0x[0-9A-Fa-f]{2}>\Z")
_UPPER_BYTE_TOKEN = re.compile(rb"<0x[0-9A-F]{2}>\Z")  # the spelling llama.cpp's byte fallback looks up
_EMPTY_NAME = re.compile(rb"\[EMPTY_(0|[1-9][0-9]*)\]\Z")  # llama.cpp's name for empty token i
# Hashes repeated in a vocabulary are confirmed against the tokens themselves this many at a time. hash() of
# bytes is keyed per process (SipHash), so in practice every repeated hash is a real duplicate and one pass
# finds it.
_SUSPECTS_PER_PASS = 1024
_SPECIAL_ID_KEY = re.compile(r"tokenizer\.ggml\.\w+_token_id\Z")


# ----------------------------------------------------------------------------------------------------------------
# Parsed structure (shared with inspect.py)


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


class _BeyondPrefix(InvalidModelFile):
    """The header goes on past the part of the file that was handed to the parser."""


class _Parser:
    """Reads the header, metadata and tensor descriptions of one GGUF file, checking every step."""

    def __init__(self, buf: Buffer, file_size: int, name: str) -> None:
        self.buf = buf
        self.avail = len(buf)  # bytes of the file we can read (a prefix when validating a partial buffer)
        self.size = file_size
        self.name = name
        self.pos = 0

    # -- errors --------------------------------------------------------------------------------------------

    def fail(self, message: str, hint: str = HINT_CORRUPT) -> NoReturn:
        raise InvalidModelFile(f"{self.name}: {message}. {hint}")

    def need(self, n: int, what: str) -> None:
        """Fail unless `n` more bytes can be read at the current position."""
        if n <= self.avail - self.pos:
            return
        if self.avail < self.size and n <= self.size - self.pos:
            raise _BeyondPrefix(
                f"{self.name}: {what} (offset {self.pos}, {n} bytes) lies beyond the first {self.avail} bytes that "
                f"were given for checking. Pass the whole header (or the whole file) to validate_bytes."
            )
        self.fail(f"{what} (offset {self.pos}, {n} bytes) runs past the end of the file (size {self.size})")

    # -- primitive reads ------------------------------------------------------------------------------------

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(value)

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(value)

    def string(self, what: str, limit: int = MAX_STRING_LENGTH) -> bytes:
        start = self.pos
        length = self.u64(f"length of {what}")
        if length > limit:
            self.pos = start
            self.fail(f"{what} at offset {start} claims a length of {length} bytes (the limit is {limit})")
        if length > self.size - self.pos:
            self.fail(
                f"{what} at offset {start} claims a length of {length} bytes, but only {self.size - self.pos} "
                f"bytes of the file (size {self.size}) are left"
            )
        self.need(length, what)
        data = self.buf[self.pos : self.pos + length]
        self.pos += length
        return bytes(data)

    # -- header ---------------------------------------------------------------------------------------------

    def parse(self) -> ParsedGGUF:
        if self.size < _HEADER_SIZE:
            self.fail(f"the file is only {self.size} bytes long, too short for a GGUF header ({_HEADER_SIZE} bytes)")
        self.need(4, "the magic number")
        magic = bytes(self.buf[0:4])
        if magic != GGUF_MAGIC:
            self.fail(
                f"not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}",
                "Use a model file in GGUF format (for example one converted with llama.cpp's convert_hf_to_gguf.py).",
            )
        self.pos = 4
        version = self.u32("the version")
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
                self.fail(
                    f"GGUF version field reads {version}: this is a big-endian file",
                    "Use a little-endian GGUF file: re-create it without the big-endian option.",
                )
            if version == 1:
                self.fail(
                    "GGUF version 1 is no longer supported",
                    "Re-download a current version of the model, or re-create it with a current GGUF converter.",
                )
            self.fail(
                f"unsupported GGUF version {version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})",
                "The file is damaged, or was written for a newer llama.cpp: re-download it or re-create it.",
            )
        n_tensors = self.u64("the tensor count")
        n_kv = self.u64("the metadata entry count")
        left = self.size - self.pos
        if n_kv > left // _MIN_KV_SIZE:
            self.fail(f"the header claims {n_kv} metadata entries, more than a file of {self.size} bytes can hold")
        if n_tensors > left // _MIN_TENSOR_INFO_SIZE:
            self.fail(f"the header claims {n_tensors} tensors, more than a file of {self.size} bytes can hold")
        if n_kv * _MIN_KV_SIZE + n_tensors * _MIN_TENSOR_INFO_SIZE > left:
            self.fail(
                f"the header claims {n_kv} metadata entries and {n_tensors} tensors, more than a file of "
                f"{self.size} bytes can hold"
            )

        kv = self.parse_kv(n_kv)
        alignment = self.alignment(kv)
        tensors_info = [self.tensor_info(i) for i in range(n_tensors)]
        self.check_tensor_names(tensors_info)
        data_offset = -(-self.pos // alignment) * alignment
        if n_tensors and data_offset > self.size:
            self.fail(
                f"the tensor data section would start at offset {data_offset}, past the end of the file "
                f"(size {self.size})"
            )
        tensors = self.place_tensors(tensors_info, data_offset, alignment)
        return ParsedGGUF(
            name=self.name,
            file_size=self.size,
            version=version,
            alignment=alignment,
            data_offset=data_offset,
            kv=kv,
            tensors=tensors,
        )

    # -- metadata -------------------------------------------------------------------------------------------

    def parse_kv(self, n_kv: int) -> dict[str, KV]:
        entries: dict[str, KV] = {}
        for index in range(n_kv):
            start = self.pos
            raw_key = self.string(f"the key of metadata entry {index}", limit=65535)
            if not raw_key:
                self.fail(f"metadata entry {index} at offset {start} has an empty key")
            if b"\0" in raw_key:
                self.fail(f"the key of metadata entry {index} at offset {start} contains a NUL byte: {_show(raw_key)}")
            try:
                key = raw_key.decode("utf-8")
            except UnicodeDecodeError:
                self.fail(f"the key of metadata entry {index} at offset {start} is not valid UTF-8: {_show(raw_key)}")
            if key in entries:
                self.fail(f"metadata key '{key}' appears twice (entries at offsets {entries[key].offset} and {start})")
            vtype = self.u32(f"the value type of metadata key '{key}'")
            if vtype == T_ARRAY:
                element_type = self.u32(f"the element type of metadata key '{key}'")
                count = self.u64(f"the element count of metadata key '{key}'")
                value = self.array(key, element_type, count)
                entries[key] = KV(key, T_ARRAY, element_type, value, start)
            elif vtype in VALUE_TYPE_NAMES:
                entries[key] = KV(key, vtype, None, self.scalar(key, vtype), start)
            else:
                self.fail(f"metadata key '{key}' (offset {start}) has unknown value type {vtype}")
        return entries

    def scalar(self, key: str, vtype: int) -> Any:
        if vtype == T_STRING:
            return self.string(f"the value of metadata key '{key}'")
        packer = _SCALAR_STRUCTS[vtype]
        self.need(packer.size, f"the value of metadata key '{key}'")
        (value,) = packer.unpack_from(self.buf, self.pos)
        if vtype == T_BOOL:
            if value > 1:
                self.fail(f"metadata key '{key}' (offset {self.pos}) is a bool with the invalid byte value {value}")
            value = bool(value)
        self.pos += packer.size
        return value

    def array(self, key: str, element_type: int, count: int) -> Any:
        if element_type == T_ARRAY:
            self.fail(f"metadata key '{key}' is an array of arrays, which GGUF readers do not support")
        if element_type not in VALUE_TYPE_NAMES:
            self.fail(f"metadata key '{key}' is an array with unknown element type {element_type}")
        left = self.size - self.pos
        if count > MAX_ARRAY_ELEMENTS:
            self.fail(f"metadata key '{key}' claims {count} array elements (the limit is {MAX_ARRAY_ELEMENTS})")
        if element_type == T_STRING:
            if count > left // 8:
                self.fail(
                    f"metadata key '{key}' claims {count} strings, more than the {left} bytes left in the file "
                    f"(size {self.size}) can hold"
                )
            return self.string_array(key, count)
        dtype = _NUMPY_DTYPES[element_type]
        n_bytes = count * dtype.itemsize
        if n_bytes > left:
            self.fail(
                f"metadata key '{key}' claims {count} {VALUE_TYPE_NAMES[element_type]} elements ({n_bytes} bytes), "
                f"more than the {left} bytes left in the file (size {self.size})"
            )
        self.need(n_bytes, f"the array of metadata key '{key}'")
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        if element_type == T_BOOL and count and int(values.max()) > 1:
            bad = int(np.argmax(values > 1))
            self.fail(f"metadata key '{key}' element {bad} is a bool with the invalid byte value {int(values[bad])}")
        self.pos += n_bytes
        return values

    def string_array(self, key: str, count: int) -> StringArray:
        # The hot loop of the parser (vocabularies have up to a few hundred thousand entries, a crafted file
        # millions): locals only, few temporaries, and nothing kept per string: the strings stay in the buffer.
        buf = self.buf
        start = pos = self.pos
        last_length_at = self.avail - 8
        unpack = _U64.unpack_from
        for i in range(count):
            if pos > last_length_at:
                self.pos = pos
                self.need(8, f"the length of element {i} of metadata key '{key}'")
            (length,) = unpack(buf, pos)
            pos += 8 + length
            if pos > self.avail or length > MAX_STRING_LENGTH:
                self.string_too_long(key, i, pos - length, length)
        self.pos = pos
        return StringArray(buf, start, count)

    def string_too_long(self, key: str, index: int, pos: int, length: int) -> None:
        """Fail for element `index` of a string array, whose `length` bytes start at `pos`, or ask for more."""
        self.pos = pos - 8
        what = f"element {index} of metadata key '{key}' (offset {pos - 8}) claims a length of {length} bytes"
        if length > MAX_STRING_LENGTH:
            self.fail(f"{what} (the limit is {MAX_STRING_LENGTH})")
        if length > self.size - pos:
            self.fail(f"{what}, but only {self.size - pos} bytes of the file (size {self.size}) are left")
        self.pos = pos
        self.need(length, f"element {index} of metadata key '{key}'")

    def alignment(self, kv: dict[str, KV]) -> int:
        entry = kv.get("general.alignment")
        if entry is None:
            return DEFAULT_ALIGNMENT
        if entry.type != T_UINT32:
            self.fail(f"metadata key 'general.alignment' must be a uint32, but is a {describe_type(entry)}")
        value = int(entry.value)
        if value == 0 or value & (value - 1):
            self.fail(f"metadata key 'general.alignment' is {value}, which is not a power of two")
        return value

    # -- tensors --------------------------------------------------------------------------------------------

    def tensor_info(self, index: int) -> tuple[str, tuple[int, ...], GGMLType, int, int, int, int]:
        start = self.pos
        raw_name = self.string(f"the name of tensor {index}", limit=MAX_STRING_LENGTH)
        if not raw_name:
            self.fail(f"tensor {index} (offset {start}) has an empty name")
        if len(raw_name) > MAX_TENSOR_NAME:
            self.fail(
                f"the name of tensor {index} (offset {start}) is {len(raw_name)} bytes long; llama.cpp allows at "
                f"most {MAX_TENSOR_NAME}: {_show(raw_name)}"
            )
        if b"\0" in raw_name:
            self.fail(f"the name of tensor {index} (offset {start}) contains a NUL byte: {_show(raw_name)}")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"the name of tensor {index} (offset {start}) is not valid UTF-8: {_show(raw_name)}")
        n_dims = self.u32(f"the dimension count of tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            self.fail(f"tensor '{name}' (offset {start}) has {n_dims} dimensions; it must have 1 to {MAX_DIMS}")
        dims: list[int] = []
        n_elements = 1
        for axis in range(n_dims):
            dim = self.u64(f"dimension {axis} of tensor '{name}'")
            if dim < 1 or dim > _INT64_MAX:
                self.fail(f"tensor '{name}' (offset {start}) has dimension {axis} of size {dim}")
            n_elements *= dim
            if n_elements > _INT64_MAX:
                self.fail(f"tensor '{name}' (offset {start}) has too many elements (shape {[*dims, dim]})")
            dims.append(dim)
        type_value = self.u32(f"the type of tensor '{name}'")
        ggml_type = GGML_TYPES.get(type_value)
        if ggml_type is None:
            self.fail(f"tensor '{name}' (offset {start}) has unknown ggml type {type_value}")
        if dims[0] % ggml_type.block_size:
            self.fail(
                f"tensor '{name}' (offset {start}) has rows of {dims[0]} elements, not a multiple of the block size "
                f"{ggml_type.block_size} of its type {ggml_type.name}"
            )
        n_bytes = n_elements // ggml_type.block_size * ggml_type.type_size
        offset = self.u64(f"the data offset of tensor '{name}'")
        return name, tuple(dims), ggml_type, offset, n_bytes, n_elements, start

    def check_tensor_names(self, infos: list[tuple[str, tuple[int, ...], GGMLType, int, int, int, int]]) -> None:
        seen: dict[str, int] = {}
        for info in infos:
            name, start = info[0], info[6]
            if name in seen:
                self.fail(f"tensor '{name}' is described twice (at offsets {seen[name]} and {start})")
            seen[name] = start

    def place_tensors(
        self,
        infos: list[tuple[str, tuple[int, ...], GGMLType, int, int, int, int]],
        data_offset: int,
        alignment: int,
    ) -> tuple[RawTensor, ...]:
        tensors: list[RawTensor] = []
        for name, dims, ggml_type, relative, n_bytes, n_elements, start in infos:
            absolute = data_offset + relative
            if relative % alignment:
                self.fail(
                    f"tensor '{name}' data (offset {absolute}) is not aligned to {alignment} bytes "
                    f"(relative offset {relative})"
                )
            if absolute + n_bytes > self.size:
                self.fail(
                    f"tensor '{name}' data (offset {absolute}, {n_bytes} bytes) runs past the end of the file "
                    f"(size {self.size})"
                )
            tensors.append(RawTensor(name, dims, ggml_type, absolute, n_bytes, n_elements, start))
        ordered = sorted(tensors, key=lambda t: t.offset)
        for before, after in itertools.pairwise(ordered):
            if after.offset < before.offset + before.n_bytes:
                self.fail(
                    f"tensor '{after.name}' data (offset {after.offset}) overlaps tensor '{before.name}' "
                    f"(offset {before.offset}, {before.n_bytes} bytes)"
                )
        return tuple(tensors)


def describe_type(entry: KV) -> str:
    if entry.type == T_ARRAY and entry.element_type is not None:
        return f"array of {VALUE_TYPE_NAMES.get(entry.element_type, '?')}"
    return VALUE_TYPE_NAMES.get(entry.type, "?")


# ----------------------------------------------------------------------------------------------------------------
# Entry points for the parse


def display_name(path: str | os.PathLike[str]) -> str:
    return os.fspath(path)


@contextlib.contextmanager
def open_gguf(path: str | os.PathLike[str]) -> Iterator[ParsedGGUF]:
    """Parse the header, metadata and tensor descriptions of a GGUF file (structural checks only).

    The file stays mapped while the block runs: its string arrays are read from there, not copied.
    """
    name = display_name(path)
    with contextlib.ExitStack() as stack:
        try:
            handle = stack.enter_context(open_regular(path))
            parsed = _parse_open_file(handle, name, stack)
        except OSError as exc:
            raise InvalidModelFile(f"{name}: cannot read the file: {exc.strerror or exc}") from exc
        yield parsed


def _parse_open_file(handle: Any, name: str, stack: contextlib.ExitStack) -> ParsedGGUF:
    size = os.fstat(handle.fileno()).st_size
    if size < _HEADER_SIZE:
        return _Parser(handle.read(size), size, name).parse()
    try:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return _parse_by_reading(handle, size, name)
    stack.callback(mapped.close)
    return _Parser(mapped, size, name).parse()


def _parse_by_reading(handle: Any, size: int, name: str) -> ParsedGGUF:
    """Fallback where a file cannot be memory-mapped: read a growing prefix until the header fits."""
    want = min(size, _FIRST_READ)
    while True:
        handle.seek(0)
        data = handle.read(want)
        try:
            return _Parser(data, size, name).parse()
        except _BeyondPrefix:
            want = min(size, want * 4)


def parse_bytes(data: bytes | bytearray | memoryview, name: str, file_size: int | None = None) -> ParsedGGUF:
    buf = bytes(data) if not isinstance(data, bytes) else data
    size = len(buf) if file_size is None else file_size
    if size < len(buf):
        raise InvalidModelFile(f"{name}: file_size {size} is smaller than the {len(buf)} bytes given")
    return _Parser(buf, size, name).parse()


# ----------------------------------------------------------------------------------------------------------------
# Semantic checks


def _fail(parsed: ParsedGGUF, message: str, hint: str) -> NoReturn:
    raise InvalidModelFile(f"{parsed.name}: {message}. {hint}")


def _int_value(parsed: ParsedGGUF, key: str, hint: str = HINT_HPARAMS) -> int | None:
    entry = parsed.kv.get(key)
    if entry is None:
        return None
    if entry.type not in INTEGER_TYPES:
        _fail(parsed, f"metadata key '{key}' must be an integer, but is a {describe_type(entry)}", hint)
    return int(entry.value)


def _string_value(parsed: ParsedGGUF, key: str, hint: str = HINT_HPARAMS) -> bytes | None:
    entry = parsed.kv.get(key)
    if entry is None:
        return None
    if entry.type != T_STRING:
        _fail(parsed, f"metadata key '{key}' must be a string, but is a {describe_type(entry)}", hint)
    value: bytes = entry.value
    return value


def _array_value(parsed: ParsedGGUF, key: str, element_type: int, hint: str) -> Any:
    entry = parsed.kv.get(key)
    if entry is None:
        return None
    if entry.type != T_ARRAY or entry.element_type != element_type:
        _fail(
            parsed,
            f"metadata key '{key}' must be an array of {VALUE_TYPE_NAMES[element_type]}, but is a "
            f"{describe_type(entry)}",
            hint,
        )
    return entry.value


def check_architecture(parsed: ParsedGGUF) -> str:
    raw = _string_value(parsed, "general.architecture", HINT_ARCH)
    if raw is None:
        _fail(parsed, "metadata key 'general.architecture' is missing", HINT_ARCH)
    arch = raw.decode("utf-8", "replace")
    if arch not in KNOWN_ARCHITECTURES:
        _fail(parsed, f"unknown model architecture '{arch}' (general.architecture)", HINT_ARCH)
    return arch


def check_hparams(parsed: ParsedGGUF, arch: str) -> None:
    for suffix in ("context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size"):
        key = f"{arch}.{suffix}"
        entry = parsed.kv.get(key)
        if entry is None or entry.type == T_ARRAY:  # some architectures give per-layer arrays
            continue
        value = _int_value(parsed, key)
        if value is not None and not 0 <= value <= _INT32_MAX:  # llama.cpp hands these out as int32
            _fail(parsed, f"metadata key '{key}' is {value}, outside 0 to {_INT32_MAX}", HINT_HPARAMS)
    block_count = _int_value(parsed, f"{arch}.block_count")
    if block_count is not None and not 0 <= block_count <= MAX_LAYERS:
        _fail(
            parsed,
            f"metadata key '{arch}.block_count' is {block_count} (llama.cpp allows 0 to {MAX_LAYERS})",
            HINT_HPARAMS,
        )
    experts = _int_value(parsed, f"{arch}.expert_count") or 0
    used = _int_value(parsed, f"{arch}.expert_used_count") or 0
    if not 0 <= experts <= MAX_EXPERTS:
        _fail(
            parsed,
            f"metadata key '{arch}.expert_count' is {experts} (llama.cpp allows 0 to {MAX_EXPERTS})",
            HINT_HPARAMS,
        )
    if used < 0 or used > experts or (experts > 0 and used == 0):
        _fail(
            parsed,
            f"metadata key '{arch}.expert_used_count' is {used} with {arch}.expert_count {experts}: it must be "
            f"between 1 and the expert count (or 0 without experts)",
            HINT_HPARAMS,
        )


def check_tensors(parsed: ParsedGGUF, arch: str) -> None:
    if not parsed.tensors:
        _fail(parsed, "the file holds no tensors", HINT_CORRUPT)
    kind = parsed.kv.get("general.type")
    if kind is not None and kind.type == T_STRING and kind.value.lower() in (b"adapter", b"mmproj", b"projector"):
        return  # LoRA adapters and projectors hold only the tensors they add to a model
    if arch in _ARCHS_WITH_TOKEN_EMBD and not any(t.name == "token_embd.weight" for t in parsed.tensors):
        _fail(parsed, f"tensor 'token_embd.weight', which every '{arch}' model needs, is missing", HINT_CORRUPT)


def _cut_at_nul(token: bytes) -> bytes:
    """A token string as llama.cpp reads it: a C string, ending at the first NUL."""
    return token[: token.index(0)] if 0 in token else token  # (an int: no bytes needle to convert)


def _show(token: bytes) -> str:
    text = repr(token.decode("utf-8", "backslashreplace"))
    return text if len(text) <= 60 else text[:57] + "..."


@attrs.frozen
class _ByteTokens:
    """Which bytes a vocabulary can spell on their own: as <0xNN> (upper-case hex) or as the raw byte."""

    hex: frozenset[int]
    raw: frozenset[int]


def _scan_vocabulary(parsed: ParsedGGUF, tokens: StringArray, byte_typed: bytes | None) -> _ByteTokens:
    """One pass over the vocabulary: the form of byte tokens, the byte tokens there are, and uniqueness.

    `byte_typed[i]` is 1 where token i has the byte type and must read <0xNN>. llama.cpp keys its vocabulary by
    token string, naming an empty token i "[EMPTY_i]"; a string that appears twice trips its assert that every
    id has its own key. Uniqueness is checked on one 64-bit hash per non-empty token (8 bytes, however long the
    token) and one byte per empty one, never on a set of the tokens themselves.
    """
    hashes = array.array("q")
    empty = bytearray(len(tokens))
    hex_bytes: set[int] = set()
    raw_bytes: set[int] = set()
    names_like_empty = False
    for index, token in enumerate(tokens):
        if 0 in token:  # (_cut_at_nul, inlined: this loop runs once per token)
            token = token[: token.index(0)]
        if not token:
            empty[index] = 1  # "[EMPTY_<index>]": unlike any other empty one
            if byte_typed is not None and byte_typed[index]:
                _fail(parsed, f"byte token {index} is empty, not of the form <0xNN>", HINT_TOKENIZER)
            continue
        hashes.append(hash(token))
        if len(token) == 1:
            raw_bytes.add(token[0])
        elif len(token) == 6 and _UPPER_BYTE_TOKEN.match(token):
            hex_bytes.add(int(token[3:5], 16))
        elif token.startswith(b"[EMPTY_"):
            names_like_empty = True
        if byte_typed is not None and byte_typed[index] and not _BYTE_TOKEN.match(token):
            _fail(parsed, f"byte token {index} is {_show(token)}, not of the form <0xNN>", HINT_TOKENIZER)

    sorted_hashes = np.frombuffer(hashes, dtype=np.int64)
    sorted_hashes.sort()
    repeated = np.unique(sorted_hashes[1:][sorted_hashes[1:] == sorted_hashes[:-1]])
    del sorted_hashes
    for batch in range(0, len(repeated), _SUSPECTS_PER_PASS):
        _find_duplicate(parsed, tokens, frozenset(repeated[batch : batch + _SUSPECTS_PER_PASS].tolist()))
    if names_like_empty:
        _find_spelled_empty_name(parsed, tokens, empty)
    return _ByteTokens(frozenset(hex_bytes), frozenset(raw_bytes))


def _find_duplicate(parsed: ParsedGGUF, tokens: StringArray, suspects: frozenset[int]) -> None:
    """Fail on the first token that repeats an earlier one, among the tokens whose hash is a suspect."""
    first: dict[bytes, int] = {}
    for index, token in enumerate(tokens):
        token = _cut_at_nul(token)
        if token and hash(token) in suspects:
            seen = first.setdefault(token, index)
            if seen != index:
                _fail(
                    parsed,
                    f"the vocabulary has the token {_show(token)} twice (ids {seen} and {index})",
                    HINT_TOKENIZER,
                )


def _find_spelled_empty_name(parsed: ParsedGGUF, tokens: StringArray, empty: bytearray) -> None:
    """Fail on a token spelled "[EMPTY_i]" where token i is empty: llama.cpp gives both that name."""
    for index, token in enumerate(tokens):
        match = _EMPTY_NAME.match(_cut_at_nul(token))
        if match is not None and int(match[1]) < len(empty) and empty[int(match[1])]:
            ids = sorted((index, int(match[1])))
            _fail(
                parsed,
                f"the vocabulary has the token {_show(match[0])} twice (ids {ids[0]} and {ids[1]})",
                HINT_TOKENIZER,
            )


@attrs.frozen
class _AddedToken:
    """A special token llama.cpp's tokenizer puts into every prompt (llama-vocab.cpp's defaults)."""

    name: str  # "bos", "eos", "sep"
    id_key: str
    default_id: int | None  # the id llama.cpp falls back to when the file names none
    added: bool  # whether it is added when tokenizer.ggml.add_<name>_token does not say
    always: bool = False  # added whatever that flag says


_BOS, _EOS, _SEP = "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.seperator_token_id"
_ADDED_TOKENS: dict[str, tuple[_AddedToken, ...]] = {
    "llama": (_AddedToken("bos", _BOS, 1, added=True), _AddedToken("eos", _EOS, 2, added=False)),
    "t5": (_AddedToken("bos", _BOS, None, added=False), _AddedToken("eos", _EOS, 1, added=True)),
    "gpt2": (_AddedToken("bos", _BOS, 11, added=False), _AddedToken("eos", _EOS, 11, added=False)),
    "bert": (
        _AddedToken("bos", _BOS, 101, added=True, always=True),
        _AddedToken("sep", _SEP, 102, added=True, always=True),
    ),
}


def check_added_tokens(parsed: ParsedGGUF, model: str | None, n_vocab: int) -> None:
    """A token the tokenizer adds to every prompt must exist: llama.cpp asserts it does when it tokenizes."""
    for token in _ADDED_TOKENS.get(model or "", ()):
        if token.id_key in parsed.kv:  # range-checked with the other special token ids
            continue
        if token.default_id is not None and token.default_id < n_vocab:
            continue
        flag_key = f"tokenizer.ggml.add_{token.name}_token"
        flag = parsed.kv.get(flag_key)
        if flag is not None and flag.type != T_BOOL:
            _fail(parsed, f"metadata key '{flag_key}' must be a bool, but is a {describe_type(flag)}", HINT_TOKENIZER)
        if token.always or (flag.value if flag is not None else token.added):
            default = "none" if token.default_id is None else f"{token.default_id}, outside the vocabulary"
            _fail(
                parsed,
                f"the '{model}' tokenizer adds a {token.name.upper()} token to every prompt, but {token.id_key} is "
                f"missing and its default id is {default} of {n_vocab} tokens",
                HINT_TOKENIZER,
            )


def check_tokenizer(parsed: ParsedGGUF) -> None:
    hint = HINT_TOKENIZER
    model_raw = _string_value(parsed, "tokenizer.ggml.model", hint)
    model = model_raw.decode("utf-8", "replace") if model_raw is not None else None
    tokens: StringArray | None = _array_value(parsed, "tokenizer.ggml.tokens", T_STRING, hint)
    if tokens is None:
        if model is not None and model not in ("none", "no_vocab"):
            _fail(
                parsed, f"tokenizer.ggml.model is '{model}' but the vocabulary (tokenizer.ggml.tokens) is missing", hint
            )
        return
    n_vocab = len(tokens)
    if n_vocab == 0:
        _fail(parsed, "the vocabulary (tokenizer.ggml.tokens) is empty", hint)
    if n_vocab >= 1 << 31:
        _fail(parsed, f"the vocabulary has {n_vocab} tokens, more than llama.cpp's 32-bit token ids allow", hint)

    scores = _array_value(parsed, "tokenizer.ggml.scores", T_FLOAT32, hint)
    if scores is not None and len(scores) != n_vocab:
        _fail(parsed, f"tokenizer.ggml.scores has {len(scores)} entries but tokenizer.ggml.tokens has {n_vocab}", hint)
    token_types = _array_value(parsed, "tokenizer.ggml.token_type", T_INT32, hint)
    if token_types is not None and len(token_types) != n_vocab:
        _fail(
            parsed,
            f"tokenizer.ggml.token_type has {len(token_types)} entries but tokenizer.ggml.tokens has {n_vocab}",
            hint,
        )
    _array_value(parsed, "tokenizer.ggml.merges", T_STRING, hint)

    byte_typed: bytes | None = None
    if token_types is not None:
        is_byte = token_types == TOKEN_TYPE_BYTE
        if model == "bert" and is_byte.any():
            index = int(np.argmax(is_byte))
            _fail(
                parsed,
                f"token {index} ({_show(_cut_at_nul(tokens[index]))}) has the byte type, which a 'bert' "
                f"(WordPiece) vocabulary cannot have",
                hint,
            )
        if model in ("llama", "t5"):
            byte_typed = is_byte.tobytes()
    byte_tokens = _scan_vocabulary(parsed, tokens, byte_typed)

    for key in sorted(k for k in parsed.kv if _SPECIAL_ID_KEY.match(k)):
        value = _int_value(parsed, key, hint)
        if value is not None and not 0 <= value < n_vocab:
            _fail(parsed, f"{key} is {value}, outside the vocabulary of {n_vocab} tokens", hint)

    if model == "llama" and byte_tokens.hex:
        # A byte-fallback vocabulary: llama.cpp looks each byte up (as <0xNN>, else the raw byte) when text has
        # no better token, and a failed lookup there aborts the process.
        missing = [c for c in range(256) if c not in byte_tokens.hex and c not in byte_tokens.raw]
        if missing:
            _fail(
                parsed,
                f"the byte-fallback vocabulary lacks the byte token <0x{missing[0]:02X}> "
                f"({len(missing)} of 256 byte tokens are missing)",
                hint,
            )
    check_added_tokens(parsed, model, n_vocab)

    charsmap = parsed.kv.get("tokenizer.ggml.precompiled_charsmap")
    if charsmap is not None:
        if charsmap.type != T_ARRAY or charsmap.element_type not in (T_UINT8, T_INT8):
            _fail(
                parsed,
                f"tokenizer.ggml.precompiled_charsmap must be an array of bytes, but is a {describe_type(charsmap)}",
                hint,
            )
        blob = charsmap.value
        if len(blob) and (len(blob) < 4 or int.from_bytes(blob[:4].tobytes(), "little") + 4 >= len(blob)):
            _fail(parsed, "tokenizer.ggml.precompiled_charsmap is shorter than the size it declares", hint)


# Keys llama.cpp reads with a typed getter that asserts the type (loading a LoRA adapter reads these).
_ASSERTED_TYPES = {"general.type": T_STRING, "adapter.type": T_STRING, "adapter.lora.alpha": T_FLOAT32}


def check_general(parsed: ParsedGGUF) -> None:
    _int_value(parsed, "general.file_type")
    for key, value_type in _ASSERTED_TYPES.items():
        entry = parsed.kv.get(key)
        if entry is not None and entry.type != value_type:
            _fail(
                parsed,
                f"metadata key '{key}' must be a {VALUE_TYPE_NAMES[value_type]}, but is a {describe_type(entry)}",
                HINT_HPARAMS,
            )
    for key, entry in parsed.kv.items():
        if (key == "tokenizer.chat_template" or key.startswith("tokenizer.chat_template.")) and entry.type != T_STRING:
            _fail(parsed, f"metadata key '{key}' must be a string, but is a {describe_type(entry)}", HINT_TOKENIZER)


def check(parsed: ParsedGGUF) -> None:
    """The semantic checks on a structurally sound file."""
    arch = check_architecture(parsed)
    check_general(parsed)
    check_tokenizer(parsed)
    check_hparams(parsed, arch)
    check_tensors(parsed, arch)


# ----------------------------------------------------------------------------------------------------------------
# Public API


def validate_file(path: str | os.PathLike[str]) -> None:
    """Check that `path` is a GGUF model file llama.cpp can safely load; raise `InvalidModelFile` if not.

    Only the header, metadata and tensor descriptions are read (through a memory map); the tensor data is
    checked for placement, not content.
    """
    name = display_name(path)
    try:
        with open_gguf(path) as parsed:
            check(parsed)
    except InvalidModelFile:
        raise
    except Exception as exc:  # a bug here must not let a file through, nor escape as another type
        raise InvalidModelFile(
            f"{name}: the file could not be checked ({type(exc).__name__}: {exc}). {HINT_CORRUPT}"
        ) from exc


# One version of a file: a blob replaced or rewritten in place gets a new one. For a blob in the store this is
# its digest, plus the evidence that the file under that name has not changed since it was checked.
_FileVersion = tuple[int, int, int, int]  # device, inode, size, modification time (ns)

_VERSIONS_KEPT = 4096
# A file modified this recently could change again within one tick of the filesystem's clock (coarse: up to 2 s
# on FAT) without its version changing, so nothing learnt from reading it is kept yet.
_SETTLED_NS = 2_000_000_000
_verdicts: dict[_FileVersion, str | None] = {}  # None: valid; else why not, without the file's name
_digests: dict[_FileVersion, str] = {}  # "sha256:<hex>" of the bytes
_memo_lock = threading.Lock()
_Learnt = TypeVar("_Learnt")
_HASH_CHUNK = 1 << 20


def _file_version(path: str | os.PathLike[str]) -> _FileVersion | None:
    """The version of the file at `path`, or None if it cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def validate_once(path: str | os.PathLike[str]) -> None:
    """`validate_file`, remembered for the life of the process: each version of a file is read once.

    Resolving a model for every request then costs a stat. A failure is remembered too, and raised again naming
    `path`. A file that changed while it was read, or shortly before, is read again next time.
    """
    name = display_name(path)
    before = _file_version(path)
    if before is not None:
        with _memo_lock:
            known, reason = before in _verdicts, _verdicts.get(before)
        if known and reason is None:
            return
        if known:
            raise InvalidModelFile(f"{name}: {reason}")
    try:
        validate_file(path)
    except InvalidModelFile as exc:
        _remember(_verdicts, path, before, str(exc).removeprefix(f"{name}: "))
        raise
    _remember(_verdicts, path, before, None)


def sha256_once(path: str | os.PathLike[str]) -> str:
    """The sha256 of the file at `path` as ``sha256:<hex>``, read once per version of the file (as `validate_once`).

    A blob whose bytes are checked against its name on every use then costs a stat, and one changed in place is
    read again. OSError if the file cannot be read.
    """
    before = _file_version(path)
    with _memo_lock:
        known = _digests.get(before) if before is not None else None
    if known is not None:
        return known
    digest = hashlib.sha256()
    with open_regular(path) as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    found = "sha256:" + digest.hexdigest()
    _remember(_digests, path, before, found)
    return found


def remember_sha256(path: str | os.PathLike[str], digest: str) -> None:
    """Record that the file at `path`, as it is now, hashes to `digest` (its writer hashed it as it wrote it)."""
    _remember(_digests, path, _file_version(path), digest)


def _remember(
    memo: dict[_FileVersion, _Learnt], path: str | os.PathLike[str], version: _FileVersion | None, learnt: _Learnt
) -> None:
    if version is None or _file_version(path) != version or time.time_ns() - version[3] < _SETTLED_NS:
        return
    with _memo_lock:
        memo[version] = learnt
        if len(memo) > _VERSIONS_KEPT:
            del memo[next(iter(memo))]  # the oldest


def validate_bytes(
    data: bytes | bytearray | memoryview, *, name: str = "<bytes>", file_size: int | None = None
) -> None:
    """Like `validate_file`, for a file held in memory.

    `data` may be only the start of a file of `file_size` bytes, as long as it holds the whole header,
    metadata and tensor descriptions: tensor data is never read, only its placement inside `file_size`.
    """
    try:
        check(parse_bytes(data, name, file_size))
    except InvalidModelFile:
        raise
    except Exception as exc:
        raise InvalidModelFile(
            f"{name}: the data could not be checked ({type(exc).__name__}: {exc}). {HINT_CORRUPT}"
        ) from exc


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether the file at `path` starts with the GGUF magic (a cheap test, not a validation)."""
    try:
        with open_regular(path) as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False
