"""A model and its projector: telling GGUF files apart by their metadata, and checking that a pair can run.

A projector run as the model, or one made for a text model of another width, would reach llama.cpp, which fails
to load the first and (libmtmd) refuses the second at load with only a log line; both are refused here with the
reason. Capabilities a projector adds ('vision', 'audio') are read here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..errors import InvalidModelFile, LocalLLMError

if TYPE_CHECKING:
    from ..gguf import GGUFInfo

__all__ = ["PairingCheck", "check_projector_width", "gguf_kind", "model_first", "projector_capabilities"]

_FileVersion = tuple[int, int, int, int] | None  # device, inode, size, mtime (ns) of a file; None if it is gone
_From = TypeVar("_From")


def gguf_kind(info: GGUFInfo) -> str:
    """'model', 'projector' or 'adapter', from a GGUF's metadata."""
    metadata = info.metadata or {}
    kind = str(metadata.get("general.type") or "").lower()
    if kind in ("projector", "mmproj") or (info.architecture or "").lower() == "clip":
        return "projector"
    if kind == "adapter":
        return "adapter"
    return "model"


def projector_capabilities(projector: Path) -> list[str]:
    """'vision' and/or 'audio', by the encoders the projector holds (an unreadable one is taken as vision)."""
    from ..gguf import read_info

    try:
        metadata = read_info(projector).metadata or {}
    except (LocalLLMError, OSError):
        return ["vision"]
    vision = bool(metadata.get("clip.has_vision_encoder"))
    audio = bool(metadata.get("clip.has_audio_encoder"))
    return (["vision"] if vision or not audio else []) + (["audio"] if audio else [])


def check_projector_width(model: GGUFInfo, projector: GGUFInfo, display: str) -> None:
    """A projector's output must be as wide as the text model's embeddings, or libmtmd refuses it at load."""
    from ..gguf.projector_checks import projection_width

    width = projection_width(projector.metadata or {}, projector.tensors)
    text_width = model.embedding_length
    if width is None or text_width is None or width == text_width:
        return
    arch = model.architecture or "model"
    raise InvalidModelFile(
        f"'{display}': the projector's output is {width} wide but the text model's embeddings are {text_width} wide"
        f" ({arch}.embedding_length): this projector was made for another model. Use the projector published with"
        " this model"
    )


def model_first(paths: Sequence[Path], froms: list[_From]) -> list[_From]:
    """`froms` (whose files are `paths`) with the model first: uploaded files, like Ollama's, are told apart by
    their metadata, not their names or order. What is not a readable GGUF file stays put, for the checks after."""
    if len(froms) < 2:
        return froms
    from ..gguf import read_info

    kinds: list[str | None] = []
    for path in paths:
        try:
            kinds.append(gguf_kind(read_info(path)) if path.is_file() else None)
        except (LocalLLMError, OSError):
            kinds.append(None)
    if kinds[0] in ("projector", "adapter") and kinds.count("model") == 1:
        index = kinds.index("model")
        return [froms[index], *froms[:index], *froms[index + 1 :]]
    return froms


def _file_version(path: Path) -> _FileVersion:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class PairingCheck:
    """Refuses a GGUF that is not a model run as one, and a projector of another width than its model's."""

    def __init__(self) -> None:
        #: Model and projector files (by version) known to pair: each pairing is read once per process.
        self._paired: set[tuple[_FileVersion, _FileVersion]] = set()

    def check(self, model_path: Path, projector: Path | None, display: str) -> None:
        key = (_file_version(model_path), _file_version(projector) if projector is not None else None)
        if key in self._paired:
            return
        from ..gguf import read_info

        info = read_info(model_path)
        kind = gguf_kind(info)
        if kind != "model":
            how = "ADAPTER <adapter file>" if kind == "adapter" else "FROM <projector file>"
            raise InvalidModelFile(
                f"'{display}' is {'an' if kind == 'adapter' else 'a'} {kind} GGUF, not a model: run the model it"
                f" belongs to (create one with FROM <model file> and {how})"
            )
        if projector is not None:
            check_projector_width(info, read_info(projector), display)
        if key[0] is not None and (projector is None or key[1] is not None):
            self._paired.add(key)
