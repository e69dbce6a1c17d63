"""The checks on a multimodal projector (the ``mmproj`` GGUF a vision or audio model carries).

libmtmd's loader (clip.cpp) reads a projector's keys with typed getters that abort the whole process when a key
has another type than the one asked for (a uint32 read from an int32 key, a bool from a string); a missing
required key, a zero patch size or head count fails later, or divides by zero. Every such key is checked here, so
a bad projector is refused with the key's name before libmtmd sees it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from localllm.gguf.metadata_checks import MAX_LAYERS, fail
from localllm.gguf.structure import (
    T_ARRAY,
    T_BOOL,
    T_FLOAT32,
    T_STRING,
    T_UINT32,
    VALUE_TYPE_NAMES,
    ParsedGGUF,
    describe_type,
)

__all__ = ["MAX_IMAGE_SIZE", "check_projector", "is_projector", "projection_width"]

HINT_PROJECTOR = (
    "The projector's metadata is not what llama.cpp's multimodal loader reads: re-create it with a current"
    " llama.cpp converter, or download the projector file made for this model again."
)
#: The largest image side a projector may declare; real ones use 224 to about 1500 pixels.
MAX_IMAGE_SIZE = 8192
_INT32_MAX = (1 << 31) - 1

# The keys clip.cpp reads with get_u32 for each encoder it loads (KEY_N_EMBD, KEY_N_HEAD, KEY_N_FF, KEY_N_BLOCK,
# KEY_PROJ_DIM), all required.
_ENCODER_U32 = ("embedding_length", "feed_forward_length", "block_count", "projection_dim", "attention.head_count")


def is_projector(parsed: ParsedGGUF) -> bool:
    """Whether the file is a multimodal projector: architecture 'clip', or general.type mmproj/projector."""
    arch = parsed.kv.get("general.architecture")
    if arch is not None and arch.type == T_STRING and arch.value == b"clip":
        return True
    kind = parsed.kv.get("general.type")
    return kind is not None and kind.type == T_STRING and kind.value.lower() in (b"mmproj", b"projector")


def _typed(parsed: ParsedGGUF, key: str, value_type: int, *, required: bool) -> object | None:
    entry = parsed.kv.get(key)
    if entry is None:
        if required:
            fail(parsed, f"projector metadata key '{key}' is missing", HINT_PROJECTOR)
        return None
    if entry.type != value_type:
        fail(
            parsed,
            f"projector metadata key '{key}' must be a {VALUE_TYPE_NAMES[value_type]}, but is a {describe_type(entry)}",
            HINT_PROJECTOR,
        )
    return entry.value


def _u32(parsed: ParsedGGUF, key: str, *, required: bool = True, minimum: int = 0) -> int | None:
    raw = _typed(parsed, key, T_UINT32, required=required)
    if raw is None:
        return None
    value = int(raw)  # type: ignore[call-overload]
    if not minimum <= value <= _INT32_MAX:  # clip.cpp refuses values past INT32_MAX, and divides by some
        fail(parsed, f"projector metadata key '{key}' is {value}; it must be {minimum} to {_INT32_MAX}", HINT_PROJECTOR)
    return value


def _flag(parsed: ParsedGGUF, key: str) -> bool:
    return bool(_typed(parsed, key, T_BOOL, required=False))


def _float_array(parsed: ParsedGGUF, key: str, minimum_length: int) -> None:
    entry = parsed.kv.get(key)
    if entry is None:
        return
    if entry.type != T_ARRAY or entry.element_type != T_FLOAT32 or len(entry.value) < minimum_length:
        fail(
            parsed,
            f"projector metadata key '{key}' must be an array of at least {minimum_length} float32 values (one"
            f" per colour channel), but is a {describe_type(entry)}"
            + (f" of {len(entry.value)}" if entry.type == T_ARRAY else ""),
            HINT_PROJECTOR,
        )


def check_projector(parsed: ParsedGGUF) -> None:
    """Refuse a projector whose metadata libmtmd would abort on, or could not use."""
    types = [
        _typed(parsed, key, T_STRING, required=False)
        for key in ("clip.projector_type", "clip.vision.projector_type", "clip.audio.projector_type")
    ]
    if not any(types):
        fail(
            parsed,
            "projector metadata key 'clip.projector_type' (or clip.vision/clip.audio.projector_type) is missing:"
            " libmtmd cannot tell how to project this encoder's output",
            HINT_PROJECTOR,
        )
    vision = _flag(parsed, "clip.has_vision_encoder")
    audio = _flag(parsed, "clip.has_audio_encoder")
    for key in ("clip.has_text_encoder", "clip.has_gen_audio_encoder", "clip.use_gelu", "clip.use_silu"):
        _typed(parsed, key, T_BOOL, required=False)
    if not (vision or audio):
        fail(
            parsed,
            "the projector has neither a vision nor an audio encoder (clip.has_vision_encoder and"
            " clip.has_audio_encoder are missing or false)",
            HINT_PROJECTOR,
        )
    for encoder, present in (("vision", vision), ("audio", audio)):
        if not present:
            continue
        for suffix in _ENCODER_U32:
            minimum = 0 if suffix == "projection_dim" else 1
            _u32(parsed, f"clip.{encoder}.{suffix}", minimum=minimum)
        blocks = _u32(parsed, f"clip.{encoder}.block_count")
        if blocks is not None and blocks > MAX_LAYERS:
            fail(
                parsed,
                f"projector metadata key 'clip.{encoder}.block_count' is {blocks} (at most {MAX_LAYERS})",
                HINT_PROJECTOR,
            )
        _u32(parsed, f"clip.{encoder}.attention.head_count_kv", required=False)
        _typed(parsed, f"clip.{encoder}.attention.layer_norm_epsilon", T_FLOAT32, required=True)
    if vision:
        _check_image_geometry(parsed)
    if audio:
        _u32(parsed, "clip.audio.num_mel_bins", minimum=1)


def _check_image_geometry(parsed: ParsedGGUF) -> None:
    image_size = _u32(parsed, "clip.vision.image_size", minimum=1)
    patch_size = _u32(parsed, "clip.vision.patch_size", minimum=1)
    assert image_size is not None and patch_size is not None
    if image_size > MAX_IMAGE_SIZE:
        fail(
            parsed,
            f"projector metadata key 'clip.vision.image_size' is {image_size} (at most {MAX_IMAGE_SIZE})",
            HINT_PROJECTOR,
        )
    if image_size < patch_size:
        fail(
            parsed,
            f"the projector's image size ({image_size}, clip.vision.image_size) is smaller than its patch size"
            f" ({patch_size}, clip.vision.patch_size)",
            HINT_PROJECTOR,
        )
    _float_array(parsed, "clip.vision.image_mean", 3)
    _float_array(parsed, "clip.vision.image_std", 3)


class ProjectorTensor(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> Sequence[int]: ...


# Where the width of a projector's output (the text model's embedding width it must match) is read, by projector
# type, as clip.cpp's clip_n_mmproj_embd reads it: (tensor, axis of its GGUF shape). The tensor is the source of
# truth; older converters wrote the CLIP encoder's own projection size into clip.vision.projection_dim.
_OUTPUT_WIDTH_TENSORS: dict[str, tuple[str, int]] = {
    "mlp": ("mm.2.weight", 1),
    "mlp_norm": ("mm.3.bias", 0),
    "gemma3": ("mm.input_projection.weight", 0),
    "qwen2vl_merger": ("mm.2.bias", 0),
    "qwen2.5vl_merger": ("mm.2.bias", 0),
    "idefics3": ("mm.model.fc.weight", 1),
}


def projection_width(metadata: Mapping[str, Any], tensors: Iterable[ProjectorTensor]) -> int | None:
    """The width of the embeddings a projector hands the text model, or None where it cannot be told.

    Read from the final projection tensor for the projector types listed above; for other types
    (`clip.vision.projection_dim` is not reliable in older files) None.
    """
    kind = metadata.get("clip.projector_type") or metadata.get("clip.vision.projector_type")
    where = _OUTPUT_WIDTH_TENSORS.get(str(kind or "").lower())
    if where is None:
        return None
    name, axis = where
    for tensor in tensors:
        if tensor.name == name and len(tensor.shape) > axis:
            return int(tensor.shape[axis])
    return None
