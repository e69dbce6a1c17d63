"""Messages between the engine and a runner child: tuples of plain values, pickled, each framed by its length.

Both ends are pipes of the engine's own child (its stdin and stdout), so nothing else writes to them; the
length is still checked, so a stray write cannot make the reader allocate without bound.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import attrs

from .protocol import LoadConfig

__all__ = ["MAX_FRAME", "ChildStart", "receive", "send"]

_HEADER = struct.Struct("!Q")
MAX_FRAME = 1 << 30
"""The largest message either side accepts, in bytes (a prompt of millions of tokens fits)."""


def send(fd: int, message: tuple[object, ...]) -> None:
    """Write one message; blocks while the pipe is full. Raises OSError once the other end is gone."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    _write_all(fd, memoryview(_HEADER.pack(len(data)) + data))


def receive(fd: int) -> object:
    """Read one message; blocks until it is whole. Raises EOFError at the end of the pipe, ValueError for a
    frame that is not one of ours."""
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    if size > MAX_FRAME:
        raise ValueError(f"a message of {size} bytes is larger than the {MAX_FRAME} a runner may send")
    return pickle.loads(_read_exact(fd, size))


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _read_exact(fd: int, size: int) -> bytes:
    parts: list[bytes] = []
    left = size
    while left:
        part = os.read(fd, min(left, 1 << 20))
        if not part:
            raise EOFError("the pipe was closed")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


@attrs.frozen
class ChildStart:
    """The first message a runner child reads: what to load, and how to behave while it serves.

    `parent_pid`: the engine's process, whose end the child outlives by no more than a pipe's end of file;
    `forward_level`: the lowest level of log records the child sends to the engine's loggers;
    `beat_interval`: seconds between the child's signs of life, which the engine watches while it has work.
    """

    parent_pid: int
    config: LoadConfig
    gpu_layers: int
    tensor_split: tuple[float, ...] | None
    prompt_cache_bytes: int
    prompt_cache_dir: Path | None
    prompt_cache_key: Path | None  # the key that signs the cache's entries (None: one in its folder)
    forward_level: int
    beat_interval: float
