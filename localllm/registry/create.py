"""What `create` may be given instead of (or besides) a Modelfile: Ollama's ``/api/create`` fields.

`Engine.create` and the HTTP shim's ``POST /api/create`` both hand these parts to
`Registry.create`, which turns them into Modelfile instructions here: uploaded
files and adapters, named by the digests of their blobs, become the paths of
those blobs; the other fields become the instructions they stand for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import attrs

from ..errors import InvalidRequest, LocalLLMError
from .modelfile import Modelfile

__all__ = ["SCRATCH_PREFIX", "CreateParts"]

#: The temporary folders a model uploaded in several files is laid out in, under their names, for conversion.
SCRATCH_PREFIX = "localllm-create-"

BlobPath = Callable[[str], Path]


def _text_map(value: Mapping[str, str] | None) -> dict[str, str]:
    return dict(value or {})


def _mapping(value: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict(value or {})


def _messages(value: Iterable[Mapping[str, Any]]) -> tuple[dict[str, str], ...]:
    return tuple({"role": str(m.get("role") or ""), "content": str(m.get("content") or "")} for m in value)


def _texts(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class CreateParts:
    """The fields of a create request other than its Modelfile, `from` and `quantize`."""

    #: File name -> digest of an uploaded blob: the model (a GGUF, or the files of a Hugging Face model).
    files: dict[str, str] = attrs.field(factory=dict, converter=_text_map)
    #: File name -> digest of an uploaded LoRA adapter.
    adapters: dict[str, str] = attrs.field(factory=dict, converter=_text_map)
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = attrs.field(factory=dict, converter=_mapping)
    messages: tuple[dict[str, str], ...] = attrs.field(default=(), converter=_messages)
    licenses: tuple[str, ...] = attrs.field(default=(), converter=_texts)
    renderer: str | None = None
    parser: str | None = None
    requires: str | None = None

    def modelfile(self, blob_path: BlobPath, scratch: Path) -> Modelfile:
        """These parts as Modelfile instructions; a model in several files is laid out in `scratch` under their names.

        Raises InvalidRequest for a digest that is not a blob of the store or a file name that would leave `scratch`.
        """
        return Modelfile.build(
            from_=self._froms(blob_path, scratch),
            adapters=[str(path) for _name, path in _blobs(self.adapters, blob_path, "adapters")],
            template=self.template,
            system=self.system,
            renderer=self.renderer,
            parser=self.parser,
            parameters=self.parameters,
            licenses=self.licenses,
            messages=self.messages,
            requires=self.requires,
        )

    def _froms(self, blob_path: BlobPath, scratch: Path) -> list[str]:
        blobs = _blobs(self.files, blob_path, "files")
        ggufs = [str(path) for name, path in blobs if name.lower().endswith(".gguf")]
        if ggufs or len(blobs) <= 1:
            return ggufs or [str(path) for _name, path in blobs]
        # A model in several files (safetensors and its JSON files) is converted from a folder, under their names.
        folder = scratch / "files"
        for name, path in blobs:
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if not parts or parts[0] == "/" or ".." in parts or "\0" in name:
                raise InvalidRequest(f"invalid file name {name!r} in files: give a relative name without '..'")
            target = folder.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
        return [str(folder)]


def _blobs(named: Mapping[str, str], blob_path: BlobPath, field: str) -> list[tuple[str, Path]]:
    """(name, blob path) of each uploaded file, which must be in the store."""
    found = []
    for name, digest in named.items():
        if not isinstance(digest, str):
            raise InvalidRequest(f"invalid value for '{field}': the digest of {name!r} must be a string")
        try:
            path = blob_path(digest)
        except LocalLLMError as exc:
            raise InvalidRequest(f"invalid digest {digest!r} for {name!r} in '{field}': {exc}") from None
        if not path.is_file():
            raise InvalidRequest(
                f"blob {digest} ({name}) is not in the store; upload it first"
                f" (Engine.create_blob, or POST /api/blobs/{digest})"
            )
        found.append((name, path))
    return found
