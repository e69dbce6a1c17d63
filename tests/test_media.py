"""Images and audio a request carries: decoded to exact pixels and samples, every size bounded before decoding."""

from __future__ import annotations

import base64
import binascii
import io
import math
import pickle
import struct
import tracemalloc
import wave
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import localllm
from localllm import ChatRequest, DecodedAudio, DecodedImage, GenerateRequest, InvalidRequest, MediaLimits, Message
from localllm.media import decode_media, media_base64
from localllm.request import as_json

pytestmark = pytest.mark.fast

LIMITS = MediaLimits()


def pattern(width: int, height: int) -> bytes:
    """Distinct RGB bytes per pixel, so a swapped row or channel shows."""
    return bytes((x * 40 + c * 7 + y * 13) % 256 for y in range(height) for x in range(width) for c in range(3))


def encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decode(
    data: str | bytes, limits: MediaLimits = LIMITS, sample_rate: int | None = None
) -> DecodedImage | DecodedAudio:
    return decode_media(data, limits=limits, where="images[0]", sample_rate=sample_rate)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", binascii.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares `width`x`height` RGB pixels, followed by a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- images decode to exact pixels


def test_png_decodes_to_the_exact_rgb_bytes() -> None:
    rgb = pattern(5, 3)
    image = decode(b64(encoded(Image.frombytes("RGB", (5, 3), rgb), "PNG")))
    assert isinstance(image, DecodedImage) and image.kind == "image"
    assert (image.width, image.height, image.rgb) == (5, 3, rgb)


@pytest.mark.parametrize("fmt", ["BMP", "WEBP"])
def test_lossless_formats_give_the_same_pixels_and_digest_as_png(fmt: str) -> None:
    source = Image.frombytes("RGB", (4, 4), pattern(4, 4))
    save = {"lossless": True} if fmt == "WEBP" else {}
    image = decode(encoded(source, fmt, **save))
    png = decode(encoded(source, "PNG"))
    assert image.rgb == png.rgb == pattern(4, 4)
    assert image.digest == png.digest  # a content hash: the same pixels, the same digest


def test_jpeg_decodes_to_its_size_and_near_its_colour() -> None:
    image = decode(encoded(Image.new("RGB", (16, 8), (200, 40, 90)), "JPEG", quality=95))
    assert isinstance(image, DecodedImage) and (image.width, image.height) == (16, 8)
    r, g, b = image.rgb[:3]
    assert abs(r - 200) < 8 and abs(g - 40) < 8 and abs(b - 90) < 8


def test_an_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("P", (6, 4), i) for i in range(3)]
    for frame in frames:
        frame.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    image = decode(data)
    assert (image.width, image.height) == (6, 4) and image.rgb == bytes([255, 0, 0]) * 24


@pytest.mark.parametrize(
    ("image", "pixel"),
    [
        (Image.new("L", (2, 2), 77), (77, 77, 77)),
        (Image.new("1", (2, 2), 1), (255, 255, 255)),
        (Image.new("RGBA", (2, 2), (10, 20, 30, 255)), (10, 20, 30)),
        (Image.new("RGBA", (2, 2), (0, 0, 0, 0)), (255, 255, 255)),  # transparent: drawn over white
        (Image.new("LA", (2, 2), (100, 255)), (100, 100, 100)),
        (Image.new("I;16", (2, 2), 0x8000), (128, 128, 128)),  # 16-bit grey: scaled, not clipped to white
    ],
    ids=["L", "1", "RGBA", "RGBA-transparent", "LA", "I;16"],
)
def test_every_mode_becomes_rgb(image: Image.Image, pixel: tuple[int, int, int]) -> None:
    decoded = decode(encoded(image, "PNG"))
    assert decoded.rgb == bytes(pixel) * 4


def test_a_palette_image_becomes_rgb() -> None:
    image = Image.new("P", (3, 1))
    image.putpalette([9, 8, 7] * 256)
    assert decode(encoded(image, "PNG")).rgb == bytes([9, 8, 7]) * 3


def test_exif_orientation_is_applied() -> None:
    source = Image.new("RGB", (4, 2), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown upright it is 2 wide, 4 high
    image = decode(encoded(source, "JPEG", exif=exif.tobytes()))
    assert (image.width, image.height) == (2, 4)


# --------------------------------------------------------------------------- sizes refused before decoding


def test_a_header_of_60000_by_60000_is_refused_without_allocating_the_pixels() -> None:
    data = b64(png_header_only(60000, 60000))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequest, match=r"images\[0\].*60000x60000.*max_side"):
            decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20


def test_too_many_pixels_within_the_side_limit_is_refused_until_the_limit_is_raised() -> None:
    data = encoded(Image.new("RGB", (200, 100), (1, 2, 3)), "PNG")  # a few hundred bytes for 20000 pixels
    small = MediaLimits(max_pixels=10_000)
    with pytest.raises(InvalidRequest, match=r"200x100 pixels \(20000\).*limit of 10000.*MediaLimits\(max_pixels"):
        decode(data, small)
    assert decode(data, MediaLimits(max_pixels=20_000)).width == 200


def test_a_side_over_the_limit_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="wider than the limit of 50"):
        decode(encoded(Image.new("RGB", (51, 1)), "PNG"), MediaLimits(max_side=50))


def test_oversize_data_is_refused_with_the_way_to_raise_the_limit() -> None:
    data = encoded(Image.new("RGB", (64, 64)), "BMP")
    with pytest.raises(InvalidRequest, match=r"images\[0\] is larger than the limit of 100 bytes.*max_bytes"):
        decode(b64(data), MediaLimits(max_bytes=100))
    with pytest.raises(InvalidRequest, match="larger than the limit"):
        decode(data, MediaLimits(max_bytes=100))


# --------------------------------------------------------------------------- bad data is an InvalidRequest


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (encoded(Image.new("RGB", (32, 32), (5, 5, 5)), "PNG")[:60], "truncated or corrupt"),
        (bytes(range(256)) * 4, "not an image"),
        (b"", "empty"),
        ("not base64!", "not valid base64"),
        ("aGk", "not valid base64"),
        (b"just some text in a file\n", "not an image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not an image"),  # formats that run other programs are never opened
        (b"ID3\x03\x00" + bytes(64), "send audio as a WAV file"),
    ],
    ids=["truncated-png", "random", "empty", "not-base64", "bad-padding", "text", "eps", "mp3"],
)
def test_bad_data_is_an_invalid_request_naming_the_item(data: str | bytes, reason: str) -> None:
    with pytest.raises(InvalidRequest, match=rf"images\[0\].*{reason}"):
        decode(data)


def test_a_short_pixel_buffer_is_refused_where_a_decoded_image_is_built() -> None:
    with pytest.raises(InvalidRequest, match="needs 12 bytes"):
        DecodedImage(2, 2, b"\x00" * 11)
    with pytest.raises(InvalidRequest):
        DecodedImage(0, 2, b"")
    with pytest.raises(InvalidRequest, match="4 bytes each"):
        DecodedAudio(b"\x00" * 6, 16000)


def test_limits_must_be_positive() -> None:
    with pytest.raises(InvalidRequest, match="max_pixels must be a positive"):
        MediaLimits(max_pixels=0)
    with pytest.raises(ValueError, match="max_audio_seconds"):
        MediaLimits(max_audio_seconds=math.inf)


def test_limits_from_the_environment() -> None:
    limits = MediaLimits.from_environment(
        {"LOCALLLM_MAX_MEDIA_BYTES": "64MiB", "LOCALLLM_MAX_IMAGE_PIXELS": "1000", "LOCALLLM_MAX_AUDIO_SECONDS": "30"}
    )
    assert limits == MediaLimits(max_bytes=64 * 2**20, max_pixels=1000, max_audio_seconds=30.0)
    assert MediaLimits.from_environment({}) == MediaLimits()
    with pytest.raises(InvalidRequest, match="LOCALLLM_MAX_IMAGE_SIDE must be a whole number"):
        MediaLimits.from_environment({"LOCALLLM_MAX_IMAGE_SIDE": "big"})
    with pytest.raises(InvalidRequest, match="LOCALLLM_MAX_MEDIA_BYTES must be more than 0"):
        MediaLimits.from_environment({"LOCALLLM_MAX_MEDIA_BYTES": "0"})


# --------------------------------------------------------------------------- what users give, as base64


def test_media_base64_takes_bytes_text_paths_and_data_urls(tmp_path: Path) -> None:
    data = encoded(Image.new("RGB", (1, 1)), "PNG")
    text = b64(data)
    path = tmp_path / "pixel.png"
    path.write_bytes(data)
    assert media_base64(data, "x") == media_base64(bytearray(data), "x") == text
    assert media_base64(text, "x") == text
    assert media_base64(path, "x") == text
    assert media_base64("data:image/png;base64," + text, "x") == text
    assert media_base64(text[:20] + "\n" + text[20:], "x") == text
    with pytest.raises(InvalidRequest, match=r"images\[3\] must be base64 text, bytes or a pathlib.Path"):
        media_base64(3, "images[3]")
    with pytest.raises(InvalidRequest, match="cannot read"):
        media_base64(tmp_path / "missing.png", "x")


def test_text_naming_an_existing_file_is_never_read_as_a_path(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"the contents of a server file")
    with pytest.raises(InvalidRequest, match="not valid base64"):
        media_base64(str(secret), "images[0]")
    name = tmp_path / "abcd"  # a path that is also valid base64 text: decoded as base64, the file unread
    name.write_bytes(b"the file's bytes")
    assert base64.b64decode(media_base64("abcd", "images[0]")) == base64.b64decode("abcd")


# --------------------------------------------------------------------------- audio


def wav(samples: np.ndarray, rate: int, width: int = 2) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as clip:
        clip.setnchannels(samples.shape[1])
        clip.setsampwidth(width)
        clip.setframerate(rate)
        clip.writeframes(samples.astype("<i2").tobytes())
    return buffer.getvalue()


def test_16_bit_stereo_44100_becomes_mono_float32_at_the_model_rate() -> None:
    seconds, rate = 0.5, 44100
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 220 * t)
    stereo = np.stack([tone * 32767 + 1000, tone * 32767 - 1000], axis=1)  # the mean is the tone
    audio = decode(b64(wav(stereo, rate)), sample_rate=16000)
    assert isinstance(audio, DecodedAudio) and audio.kind == "audio" and audio.sample_rate == 16000
    assert audio.n_samples == 8000
    samples = np.frombuffer(audio.samples, dtype="<f4")
    expected = 0.5 * np.sin(2 * np.pi * 220 * np.arange(8000) / 16000)
    assert np.max(np.abs(samples - expected)) < 0.01


def test_audio_over_the_time_limit_is_refused_from_its_header() -> None:
    data = wav(np.zeros((16000 * 3, 1)), 16000)
    with pytest.raises(InvalidRequest, match=r"3.0 seconds.*limit of 2.*max_audio_seconds"):
        decode(data, MediaLimits(max_audio_seconds=2), sample_rate=16000)


def test_audio_for_a_model_that_does_not_hear_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="is audio, but this model has no audio input"):
        decode(wav(np.zeros((100, 1)), 16000))


def test_a_truncated_wav_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest, match=r"images\[0\]"):
        decode(wav(np.zeros((100, 1)), 16000)[:30], sample_rate=16000)


# --------------------------------------------------------------------------- requests carry base64 text


def test_requests_carry_images_as_base64_text(tmp_path: Path) -> None:
    data = encoded(Image.new("RGB", (1, 1)), "PNG")
    path = tmp_path / "pixel.png"
    path.write_bytes(data)
    generate = GenerateRequest("m", "what is this?", images=[data])
    chat = ChatRequest("m", [{"role": "user", "content": "x", "images": [path]}])
    assert generate.images == (b64(data),)
    assert chat.messages[0].images == (b64(data),)
    assert Message(role="user", images=(data,)).images == (b64(data),)
    for request in (generate, chat):
        assert pickle.loads(pickle.dumps(request)) == request
    assert as_json(generate)["images"] == [b64(data)]
    assert as_json(chat)["messages"][0]["images"] == [b64(data)]


def test_a_bad_image_in_a_message_is_named_by_its_place() -> None:
    with pytest.raises(InvalidRequest, match=r"messages\[1\]\.images\[0\] is not valid base64"):
        ChatRequest("m", [{"role": "user", "content": "a"}, {"role": "user", "content": "b", "images": ["?"]}])
    with pytest.raises(InvalidRequest, match=r"images\[1\]"):
        GenerateRequest("m", "x", images=["aGk=", 5])


def test_the_media_names_are_public() -> None:
    assert {"MediaLimits", "DecodedImage", "DecodedAudio"} <= set(localllm.__all__)
