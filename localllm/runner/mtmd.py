"""Images and audio through llama.cpp's libmtmd: a projector turns each item into embeddings the model reads.

Only checked media reach C: a `DecodedImage`'s RGB buffer holds exactly width x height x 3 bytes and a
`DecodedAudio`'s samples are whole float32s (`localllm.media` bounds both), and both are checked again
here before a bitmap is made from them, since libmtmd copies as many bytes as the sizes say.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Protocol, cast

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd

from ..errors import CapabilityError, InvalidRequest, ModelLoadError
from ..media import DecodedAudio, DecodedImage, Media
from .backend import Context
from .protocol import MediaLayout

__all__ = ["MtmdProjector"]

_CHUNK_TEXT = 0  # MTMD_INPUT_CHUNK_TYPE_TEXT; image and audio chunks are the others


class _NativeContext(Protocol):
    """What the projector reads of a llama.cpp context (`llama.LlamaContext`)."""

    handle: Any
    n_batch: int


def route_logs(callback: Any) -> None:
    """Send libmtmd's log lines to `callback` (llama.cpp's log callback)."""
    mtmd.mtmd_helper_log_set(callback, ctypes.c_void_p(0))  # libmtmd's and its helpers'


class MtmdProjector:
    """A model's projector: how many embeddings each image or audio clip becomes, and evaluating them into
    a sequence's cache. Its calls into libmtmd take one lock: tokenizing (from the request's thread) and
    encoding (from the runner's) never overlap."""

    def __init__(self, model_handle: Any, model_path: str, path: str, *, n_threads: int, use_gpu: bool) -> None:
        """`model_handle`: the llama.cpp model the projector feeds (loaded from `model_path`)."""
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        handle = mtmd.mtmd_init_from_file(path.encode(), model_handle, params)
        if not handle:
            raise ModelLoadError(
                f"llama.cpp could not load the projector {path} for {model_path}; the localllm.llama_cpp log "
                "says why (a projector made for another model, or of a kind this llama.cpp does not know)"
            )
        self.handle: Any = handle
        self.path = path
        self.vision = bool(mtmd.mtmd_support_vision(handle))
        self.audio = bool(mtmd.mtmd_support_audio(handle))
        self.sample_rate: int | None = int(mtmd.mtmd_get_audio_sample_rate(handle)) if self.audio else None
        self._lock = threading.Lock()

    def layout(self, media: Media) -> MediaLayout:
        with self._lock:
            chunks = self._tokenize(media)
            try:
                before: list[int] = []
                after: list[int] = []
                count = positions = 0
                for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                    chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                    if mtmd.mtmd_input_chunk_get_type(chunk) == _CHUNK_TEXT:
                        (after if count else before).extend(_text_tokens(chunk))
                    elif count:
                        raise InvalidRequest("the projector split one media item in two, which localllm cannot place")
                    else:
                        count = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
                        positions = int(mtmd.mtmd_input_chunk_get_n_pos(chunk))
                if count <= 0 or not 0 < positions <= count:
                    raise InvalidRequest("the projector made no embeddings of this media item")
                return MediaLayout(tuple(before), count, tuple(after), positions)
            finally:
                mtmd.mtmd_input_chunks_free(chunks)

    def evaluate(self, context: Context, media: Media, *, position: int, seq_id: int) -> int:
        """Encode the item and decode its embeddings into the sequence from `position` on: 0 on success,
        else llama.cpp's status (negative where the projector failed)."""
        native = cast("_NativeContext", context)
        with self._lock:
            chunks = self._tokenize(media)
            try:
                for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                    chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                    if mtmd.mtmd_input_chunk_get_type(chunk) != _CHUNK_TEXT:
                        break
                else:
                    return -1
                if mtmd.mtmd_encode_chunk(self.handle, chunk) != 0:
                    return -1
                embeddings = mtmd.mtmd_get_output_embd(self.handle)
                if not embeddings:
                    return -1
                end = llama_cpp.llama_pos(0)
                return int(
                    mtmd.mtmd_helper_decode_image_chunk(
                        self.handle,
                        native.handle,
                        chunk,
                        embeddings,
                        position,
                        seq_id,
                        native.n_batch,
                        ctypes.byref(end),
                        mtmd.mtmd_helper_post_decode_callback(),
                        None,
                    )
                )
            finally:
                mtmd.mtmd_input_chunks_free(chunks)

    def close(self) -> None:
        if self.handle is not None:
            mtmd.mtmd_free(self.handle)
            self.handle = None

    def _tokenize(self, media: Media) -> Any:
        """The item as libmtmd's chunks (the caller frees them)."""
        bitmap = self._bitmap(media)
        try:
            part = mtmd.mtmd_input_part()
            part.bitmap = bitmap
            parts = (ctypes.POINTER(mtmd.mtmd_input_part) * 1)(ctypes.pointer(part))
            chunks = mtmd.mtmd_input_chunks_init()
            if not chunks:
                raise MemoryError("libmtmd could not allocate input chunks")
            status = mtmd.mtmd_tokenize_from_parts(self.handle, chunks, parts, 1, False)
            if status != 0:
                mtmd.mtmd_input_chunks_free(chunks)
                raise InvalidRequest(f"the projector could not read this media item (libmtmd status {status})")
            return chunks
        finally:
            mtmd.mtmd_bitmap_free(bitmap)

    def _bitmap(self, media: Media) -> Any:
        if isinstance(media, DecodedImage):
            if not self.vision:
                raise CapabilityError("this model's projector takes audio, not images")
            size = media.width * media.height * 3
            if media.width <= 0 or media.height <= 0 or len(media.rgb) != size:
                raise InvalidRequest("an image's pixels do not match its size")
            pixels = (ctypes.c_uint8 * size).from_buffer_copy(media.rgb)
            bitmap = mtmd.mtmd_bitmap_init(media.width, media.height, pixels)
        elif isinstance(media, DecodedAudio):
            if not self.audio:
                raise CapabilityError("this model's projector takes images, not audio")
            if media.sample_rate != self.sample_rate:
                raise InvalidRequest(f"audio must be at {self.sample_rate} Hz for this model, not {media.sample_rate}")
            count = len(media.samples) // 4
            if count <= 0 or len(media.samples) != count * 4:
                raise InvalidRequest("an audio clip's samples are not whole 32-bit floats")
            samples = (ctypes.c_float * count).from_buffer_copy(media.samples)
            bitmap = mtmd.mtmd_bitmap_init_from_audio(count, samples)
        else:
            raise InvalidRequest(f"expected a decoded image or audio clip, got {type(media).__name__}")
        if not bitmap:
            raise InvalidRequest("libmtmd could not take this media item")
        mtmd.mtmd_bitmap_set_id(bitmap, media.digest.hex().encode())
        return bitmap


def _text_tokens(chunk: Any) -> list[int]:
    count = ctypes.c_size_t(0)
    tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
    return [int(tokens[i]) for i in range(count.value)] if tokens else []
