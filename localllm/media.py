"""The images and audio a request carries: read, decoded and bounded before anything reaches llama.cpp.

A vision or audio model is handed pixels (RGB8) or samples (float32 mono), and the C side copies exactly
``width * height * 3`` bytes (or ``n_samples * 4``) from what it is given: a buffer shorter than its
dimensions would be read past its end, and an unbounded size would exhaust memory. So every size is checked
here, from the file's header before anything is decoded, and `DecodedImage` / `DecodedAudio` check that
their buffers match their dimensions when they are built: a value of either type is safe to hand on.

Requests carry media as base64 text, as Ollama's API does (`media_base64` turns what a library user gives
into it); `decode_media` turns that text into a `DecodedImage` or a `DecodedAudio`, or raises
`InvalidRequest` naming the item and what is wrong, and never anything else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import os
import re
import struct
import warnings
import wave
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from .errors import InvalidRequest
from .files import open_regular

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

__all__ = ["IMAGE_FORMATS", "DecodedAudio", "DecodedImage", "Media", "MediaLimits", "decode_media", "media_base64"]

MiB = 1 << 20

#: The image formats decoded (Pillow's names). Others are refused: each format is parser code run on what
#: a stranger sent, and some of Pillow's call out to other programs (EPS runs Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")

_RAISE_HINT = "raise it with Engine(media_limits=MediaLimits({field}=...))"


# --------------------------------------------------------------------------- the limits


def _positive_int(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"MediaLimits.{attribute.name} must be a positive whole number, got {value!r}")


def _positive_number(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise InvalidRequest(f"MediaLimits.{attribute.name} must be a positive finite number, got {value!r}")


_SIZE = re.compile(r"(?i)^\s*([0-9]+(?:\.[0-9]*)?)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$")
_UNITS = {"": 1, "b": 1, "kb": 1000, "kib": 1 << 10, "mb": 1000**2, "mib": 1 << 20, "gb": 1000**3, "gib": 1 << 30}


def _parse_size(text: str) -> int:
    """A number of bytes, bare or with a unit: ``33554432``, ``32MiB``, ``40MB``."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError("must be a number of bytes, such as 33554432 or 32MiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def _parse_count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("must be a whole number") from None


def _parse_seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("must be a number of seconds") from None


#: MediaLimits' fields read from the environment: (field, variable, parser).
_ENVIRONMENT = (
    ("max_bytes", "LOCALLLM_MAX_MEDIA_BYTES", _parse_size),
    ("max_pixels", "LOCALLLM_MAX_IMAGE_PIXELS", _parse_count),
    ("max_side", "LOCALLLM_MAX_IMAGE_SIDE", _parse_count),
    ("max_audio_seconds", "LOCALLLM_MAX_AUDIO_SECONDS", _parse_seconds),
)


@attrs.frozen
class MediaLimits:
    """The bounds on the images and audio one request may carry; raise them for larger media."""

    max_bytes: int = attrs.field(default=32 * MiB, validator=_positive_int)  # encoded size of one item
    max_pixels: int = attrs.field(default=50_000_000, validator=_positive_int)  # width * height of one image
    max_side: int = attrs.field(default=16384, validator=_positive_int)  # an image's widest side, pixels
    max_audio_seconds: float = attrs.field(default=600.0, validator=_positive_number)  # one audio clip
    max_items: int = attrs.field(default=32, validator=_positive_int)  # images and audio in one request

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> MediaLimits:
        """The defaults, with LOCALLLM_MAX_MEDIA_BYTES, LOCALLLM_MAX_IMAGE_PIXELS, LOCALLLM_MAX_IMAGE_SIDE and
        LOCALLLM_MAX_AUDIO_SECONDS over them where set; a bad value is an `InvalidRequest` naming its variable."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field, variable, parse in _ENVIRONMENT:
            text = environ.get(variable, "").strip().strip("\"'")
            if not text:
                continue
            try:
                value = parse(text)
            except ValueError as exc:
                raise InvalidRequest(f"environment variable {variable} {exc}, got {text!r}") from None
            if not 0 < value < math.inf:
                raise InvalidRequest(f"environment variable {variable} must be more than 0, got {text!r}")
            values[field] = value
        return cls(**values)

    def check_count(self, count: int, where: str = "the request") -> None:
        """Refuse more than `max_items` images and audio clips in one request."""
        if count > self.max_items:
            raise InvalidRequest(
                f"{where} carries {count} images and audio clips, more than the limit of {self.max_items}; "
                + _RAISE_HINT.format(field="max_items")
            )


# --------------------------------------------------------------------------- what decoding yields


def _bytes(value: object) -> bytes:
    """An immutable copy: a bytearray checked now could be shortened later, behind the check."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise InvalidRequest(f"media data must be bytes, got {type(value).__name__}")


def _dimension(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(
            f"{type(instance).__name__}.{attribute.name} must be a positive whole number, got {value!r}"
        )


@attrs.frozen
class DecodedImage:
    """An image as a vision model's projector takes it: RGB8 pixels, row by row, exactly width*height*3 bytes.

    `digest` is a hash of the pixels and their size (not of the encoded file): the same picture sent as PNG
    or as BMP has the same digest, so a cache can key on it.
    """

    kind: ClassVar[str] = "image"

    width: int = attrs.field(validator=_dimension)
    height: int = attrs.field(validator=_dimension)
    rgb: bytes = attrs.field(converter=_bytes, repr=False)
    digest: bytes = attrs.field(repr=False)

    @digest.default
    def _digest(self) -> bytes:
        return hashlib.sha256(b"image" + struct.pack("<QQ", self.width, self.height) + self.rgb).digest()

    def __attrs_post_init__(self) -> None:
        expected = self.width * self.height * 3
        if len(self.rgb) != expected:
            raise InvalidRequest(
                f"a {self.width}x{self.height} RGB image needs {expected} bytes of pixels, got {len(self.rgb)}"
            )
        if not isinstance(self.digest, bytes) or len(self.digest) != 32:
            raise InvalidRequest("DecodedImage.digest must be 32 bytes (sha256)")


@attrs.frozen
class DecodedAudio:
    """An audio clip as an audio model's projector takes it: float32 little-endian mono samples at `sample_rate`.

    `digest` is a hash of the samples and their rate, as `DecodedImage.digest` is of pixels.
    """

    kind: ClassVar[str] = "audio"

    samples: bytes = attrs.field(converter=_bytes, repr=False)
    sample_rate: int = attrs.field(validator=_dimension)
    digest: bytes = attrs.field(repr=False)

    @digest.default
    def _digest(self) -> bytes:
        return hashlib.sha256(b"audio" + struct.pack("<Q", self.sample_rate) + self.samples).digest()

    def __attrs_post_init__(self) -> None:
        if len(self.samples) % 4:
            raise InvalidRequest(f"float32 samples take 4 bytes each; got {len(self.samples)} bytes")
        if not isinstance(self.digest, bytes) or len(self.digest) != 32:
            raise InvalidRequest("DecodedAudio.digest must be 32 bytes (sha256)")

    @property
    def n_samples(self) -> int:
        return len(self.samples) // 4

    @property
    def seconds(self) -> float:
        return self.n_samples / self.sample_rate


#: What `decode_media` gives: pixels or samples.
Media = DecodedImage | DecodedAudio


# --------------------------------------------------------------------------- base64, as requests carry media

_WHITESPACE = re.compile(r"\s+")
_DATA_URL = re.compile(r"^data:[^,;]*(?:;[^,;]*)*;base64,", re.IGNORECASE)


def _base64_text(text: str) -> str:
    """`text` without whitespace or a ``data:...;base64,`` prefix; ValueError unless it is strict base64."""
    text = _DATA_URL.sub("", _WHITESPACE.sub("", text), count=1)
    if len(text) % 4:
        raise ValueError("its length is not a multiple of 4")
    base64.b64decode(text, validate=True)  # binascii.Error outside the alphabet, or with '=' but at the end
    return text


def media_base64(value: object, where: str) -> str:
    """One image or audio item, in the form a user gives it, as the base64 text Ollama's API carries.

    Bytes (bytes, bytearray, memoryview) are encoded; text must be base64 already (whitespace and a
    ``data:image/png;base64,`` prefix are dropped); a path (`pathlib.Path`, any ``os.PathLike``) is read, up
    to ``MediaLimits().max_bytes``. Text is never read as a path, so what arrives over HTTP cannot name a file.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, str):
        try:
            return _base64_text(value)
        except (ValueError, binascii.Error):
            raise InvalidRequest(
                f"{where} is not valid base64; send the file's bytes base64-encoded (or, from Python, "
                "bytes or a pathlib.Path)"
            ) from None
    if isinstance(value, os.PathLike):
        return base64.b64encode(_read_file(value, where, MediaLimits().max_bytes)).decode("ascii")
    raise InvalidRequest(
        f"{where} must be base64 text, bytes or a pathlib.Path to the file, got {type(value).__name__}"
    )


def _read_file(path: os.PathLike[Any], where: str, limit: int) -> bytes:
    try:
        with open_regular(os.fspath(path)) as file:
            data = file.read(limit + 1)
    except OSError as exc:
        raise InvalidRequest(f"{where}: cannot read {os.fspath(path)!r}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise InvalidRequest(
            f"{where}: {os.fspath(path)!r} is larger than the limit of {limit} bytes; "
            + _RAISE_HINT.format(field="max_bytes")
        )
    return data


# --------------------------------------------------------------------------- decoding


def decode_media(data: str | bytes, *, limits: MediaLimits, where: str, sample_rate: int | None = None) -> Media:
    """An item's base64 text (or its bytes) as pixels or samples, bounded by `limits`.

    A WAV file (RIFF/WAVE) is audio, resampled to `sample_rate`, the rate of the model's audio projector
    (None: the model does not hear, and audio is refused); anything else must be an image in one of
    `IMAGE_FORMATS`. Every failure is an `InvalidRequest` naming `where` and the reason.
    """
    raw = _encoded_bytes(data, limits, where)
    if not raw:
        raise InvalidRequest(f"{where} is empty; send the bytes of an image or a WAV file")
    if raw[:4] == b"RIFF" and raw[8:12] == b"WAVE":
        if sample_rate is None:
            raise InvalidRequest(f"{where} is audio, but this model has no audio input")
        return _decode_wav(raw, limits, where, sample_rate)
    if _looks_like_audio(raw):
        raise InvalidRequest(f"{where} looks like compressed audio; send audio as a WAV file (PCM)")
    return _decode_image(raw, limits, where)


def _encoded_bytes(data: str | bytes, limits: MediaLimits, where: str) -> bytes:
    hint = _RAISE_HINT.format(field="max_bytes")
    too_large = f"{where} is larger than the limit of {limits.max_bytes} bytes; {hint}"
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    elif isinstance(data, str):
        # Refuse oversize text before decoding it: base64 takes 4 characters for 3 bytes (and a data: prefix).
        bound = 4 * math.ceil(limits.max_bytes / 3) + 256
        if len(data) > bound and len(_WHITESPACE.sub("", data)) > bound:
            raise InvalidRequest(too_large)
        try:
            raw = base64.b64decode(_base64_text(data), validate=True)
        except (ValueError, binascii.Error):
            raise InvalidRequest(f"{where} is not valid base64; send the file's bytes base64-encoded") from None
    else:
        raise InvalidRequest(f"{where} must be base64 text or bytes, got {type(data).__name__}")
    if len(raw) > limits.max_bytes:
        raise InvalidRequest(too_large)
    return raw


def _looks_like_audio(raw: bytes) -> bool:
    """MP3 (with or without ID3), FLAC, Ogg and MP4 audio: formats a user might send instead of WAV."""
    if raw[:3] == b"ID3" or raw[:4] in (b"fLaC", b"OggS"):
        return True
    if raw[:1] == b"\xff" and raw[1:2] in (b"\xfb", b"\xfa", b"\xf3", b"\xf2", b"\xe3", b"\xe2"):
        return True  # an MPEG audio frame's sync (a JPEG opens with FF D8)
    return raw[4:8] == b"ftyp" and raw[8:11] in (b"M4A", b"M4B", b"mp4")


def _decode_image(raw: bytes, limits: MediaLimits, where: str) -> DecodedImage:
    from PIL import Image, ImageOps, UnidentifiedImageError

    Image.init()  # registers every format's opener; Image.open looks the named formats up without doing so
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns, then raises: both refuse here, whatever the global filters say.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as image:
                # Image.open read only the header: check the size before any pixel is decoded.
                _check_size(image.size, limits, where)
                image.load()
                upright = ImageOps.exif_transpose(image)
                rgb = _as_rgb(upright)
                width, height = rgb.size
                pixels = rgb.tobytes()
    except InvalidRequest:
        raise
    except UnidentifiedImageError:
        raise InvalidRequest(
            f"{where} is not an image in a format read here ({', '.join(IMAGE_FORMATS)}) nor a WAV file"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow checks its own ceiling (Image.MAX_IMAGE_PIXELS) inside Image.open, before .size can be read.
        size = _header_size(raw)
        if size is not None:
            _check_size(size, limits, where)
        raise InvalidRequest(f"{where} has more pixels than the image decoder takes ({exc}); scale it down") from None
    except MemoryError:
        raise InvalidRequest(f"{where} is too large to decode in the memory there is") from None
    except Exception as exc:  # a decoder's failure on a stranger's bytes, of whatever kind, is bad input
        raise InvalidRequest(f"{where} is a truncated or corrupt image: {exc or type(exc).__name__}") from None
    return DecodedImage(width, height, pixels)


def _header_size(raw: bytes) -> tuple[int, int] | None:
    """The size an image's header declares, read by its format's opener without Image.open's ceiling."""
    from PIL import Image

    for name in IMAGE_FORMATS:
        factory, accept = Image.OPEN[name]
        try:
            if accept is None or accept(raw[:16]):
                return factory(io.BytesIO(raw), "").size
        except Exception:  # not this format: try the next
            continue
    return None


def _check_size(size: tuple[int, int], limits: MediaLimits, where: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InvalidRequest(f"{where} is an image of {width}x{height} pixels: it has no pixels")
    if max(width, height) > limits.max_side:
        raise InvalidRequest(
            f"{where} is an image of {width}x{height} pixels, wider than the limit of {limits.max_side} pixels "
            "a side; scale it down, or " + _RAISE_HINT.format(field="max_side")
        )
    if width * height > limits.max_pixels:
        raise InvalidRequest(
            f"{where} is an image of {width}x{height} pixels ({width * height}), more than the limit of "
            f"{limits.max_pixels}; scale it down, or " + _RAISE_HINT.format(field="max_pixels")
        )


def _as_rgb(image: Image.Image) -> Image.Image:
    """Any mode as RGB8: transparency drawn over white (as Ollama does), 16-bit and float greys scaled to 8 bits."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if image.mode.startswith(("I", "F")):
        return Image.fromarray(_grey_8bit(image), "L").convert("RGB")
    return image.convert("RGB")


def _grey_8bit(image: Image.Image) -> np.ndarray[Any, Any]:
    """A 16-bit, 32-bit or float grey image's values as 0..255 (Pillow's convert clips them instead)."""
    import numpy as np

    values = np.asarray(image)
    if image.mode == "F":
        scaled = np.clip(np.nan_to_num(values), 0, 255)
    else:  # I;16 and I: 16-bit samples (a 16-bit PNG opens as either), the high byte kept
        scaled = np.clip(values.astype(np.int64) >> 8, 0, 255)
    return np.ascontiguousarray(scaled.astype(np.uint8))


# --------------------------------------------------------------------------- audio

_MAX_CHANNELS = 64


def _decode_wav(raw: bytes, limits: MediaLimits, where: str, sample_rate: int) -> DecodedAudio:
    import numpy as np

    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 1:
        raise InvalidRequest(f"the model's audio sample rate must be a positive whole number, got {sample_rate!r}")
    try:
        with wave.open(io.BytesIO(raw), "rb") as clip:
            channels, width, rate = clip.getnchannels(), clip.getsampwidth(), clip.getframerate()
            frames = clip.getnframes()
            if not 1 <= channels <= _MAX_CHANNELS or width not in (1, 2, 3, 4) or rate < 1:
                raise InvalidRequest(
                    f"{where} is a WAV file of {channels} channels, {width * 8}-bit samples at {rate} Hz: "
                    "send 8, 16, 24 or 32-bit PCM"
                )
            # The header says how long the clip is: refuse a long one before reading its samples.
            seconds = frames / rate
            if seconds > limits.max_audio_seconds:
                raise InvalidRequest(
                    f"{where} is {seconds:.1f} seconds of audio, more than the limit of "
                    f"{limits.max_audio_seconds:g}; cut it, or " + _RAISE_HINT.format(field="max_audio_seconds")
                )
            data = clip.readframes(frames)
    except InvalidRequest:
        raise
    except wave.Error as exc:
        if "unknown format: 3" in str(exc):
            raise InvalidRequest(f"{where} is a WAV file of float samples; send 8, 16, 24 or 32-bit PCM") from None
        raise InvalidRequest(f"{where} is not a WAV file read here ({exc}); send 8, 16, 24 or 32-bit PCM") from None
    except (EOFError, struct.error, ValueError, OSError) as exc:
        raise InvalidRequest(f"{where} is a truncated or corrupt WAV file: {exc or type(exc).__name__}") from None

    frame_bytes = channels * width
    whole = len(data) // frame_bytes
    if whole == 0:
        raise InvalidRequest(f"{where} is a WAV file with no samples")
    values = _pcm_as_float(data[: whole * frame_bytes], width).reshape(whole, channels).mean(axis=1)
    if rate != sample_rate:
        count = max(1, round(whole * sample_rate / rate))
        values = np.interp(np.arange(count) * (rate / sample_rate), np.arange(whole), values)
    return DecodedAudio(np.asarray(values, dtype="<f4").tobytes(), sample_rate)


def _pcm_as_float(data: bytes, width: int) -> np.ndarray[Any, Any]:
    """PCM samples as floats in [-1, 1): 8-bit WAV is unsigned, wider samples signed little-endian."""
    import numpy as np

    if width == 1:
        return (np.frombuffer(data, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(data, dtype="<i2").astype(np.float64) / 32768.0
    if width == 3:
        triples = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        joined = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        signed = np.where(joined >= 1 << 23, joined - (1 << 24), joined)
        return signed.astype(np.float64) / float(1 << 23)
    return np.frombuffer(data, dtype="<i4").astype(np.float64) / float(1 << 31)
