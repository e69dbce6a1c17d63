"""Small media files for the tests that send images and audio: real ones, and hostile ones."""

from __future__ import annotations

import base64
import io
import struct
import wave
import zlib


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png(color: tuple[int, int, int], size: int = 32) -> bytes:
    """A real PNG of one colour."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` pixels with next to nothing behind it: a decompression
    bomb's opening, which must be refused from the header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def wav(seconds: float = 0.1, rate: int = 16000) -> bytes:
    """A real WAV clip: mono 16-bit PCM, a constant level."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as clip:
        clip.setnchannels(1)
        clip.setsampwidth(2)
        clip.setframerate(rate)
        clip.writeframes(b"\x00\x10" * int(seconds * rate))
    return buffer.getvalue()
