"""The defensive structural parse: the header, metadata and tensor descriptions of a GGUF file.

llama.cpp aborts the whole process on many malformed files (failed asserts, out-of-range reads), so nothing
that could reach one of those paths may pass. The parser never trusts a count or a length before comparing
it with the bytes that are left, never allocates from an unchecked count, does not recurse (GGUF arrays of
arrays are refused, as llama.cpp refuses them), and turns every problem into `InvalidModelFile` with a
message that names what is wrong, where, and what to do about it.

Memory stays proportional to the metadata actually present, never to a declared count: string arrays (the
vocabulary, merges) are not copied out of the mapped file but read in place while it is open (`open_gguf`).
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import struct
from collections.abc import Iterator
from typing import Any, NoReturn

import numpy as np

from localllm.errors import InvalidModelFile
from localllm.files import open_regular
from localllm.gguf.structure import (
    GGML_TYPES,
    GGUF_MAGIC,
    HINT_CORRUPT,
    KV,
    T_ARRAY,
    T_BOOL,
    T_FLOAT32,
    T_FLOAT64,
    T_INT8,
    T_INT16,
    T_INT32,
    T_INT64,
    T_STRING,
    T_UINT8,
    T_UINT16,
    T_UINT32,
    T_UINT64,
    VALUE_TYPE_NAMES,
    Buffer,
    GGMLType,
    ParsedGGUF,
    RawTensor,
    StringArray,
    describe_type,
    show_bytes,
)

__all__ = ["display_name", "open_gguf", "parse_bytes"]

SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Limits llama.cpp itself applies (gguf.cpp, ggml.h).
MAX_STRING_LENGTH = 1 << 30
MAX_ARRAY_ELEMENTS = 1 << 30
MAX_TENSOR_NAME = 63  # GGML_MAX_NAME is 64, including the terminating NUL
MAX_DIMS = 4
_INT64_MAX = (1 << 63) - 1

_HEADER_SIZE = 4 + 4 + 8 + 8
_FIRST_READ = 8 << 20  # where a file cannot be memory-mapped, the prefix read first (then 4x larger)
# The smallest encodings, used to bound counts by the bytes that are left.
_MIN_KV_SIZE = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR_INFO_SIZE = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset

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

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


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
                self.fail(
                    f"the key of metadata entry {index} at offset {start} contains a NUL byte: {show_bytes(raw_key)}"
                )
            try:
                key = raw_key.decode("utf-8")
            except UnicodeDecodeError:
                self.fail(
                    f"the key of metadata entry {index} at offset {start} is not valid UTF-8: {show_bytes(raw_key)}"
                )
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
                f"most {MAX_TENSOR_NAME}: {show_bytes(raw_name)}"
            )
        if b"\0" in raw_name:
            self.fail(f"the name of tensor {index} (offset {start}) contains a NUL byte: {show_bytes(raw_name)}")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"the name of tensor {index} (offset {start}) is not valid UTF-8: {show_bytes(raw_name)}")
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
