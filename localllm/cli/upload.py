"""A Modelfile as Ollama's ``POST /api/create`` takes it: the files it names become blobs to upload first.

A ``FROM`` or ``ADAPTER`` naming a file (or, for ``FROM``, a Hugging Face model folder) on this machine,
relative to the Modelfile's folder, is sent as ``files`` or ``adapters`` (name -> digest); a ``FROM`` naming
a model stays a name, for the server to find in its own store. The other instructions become the request's
fields, so any server speaking Ollama's API can build the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..files import sha256_of
from ..parsing import parse_modelfile
from .errors import CLIError

__all__ = ["modelfile_request"]

#: The files of a model folder a server needs to convert it: weights, configuration, tokenizer, chat template.
MODEL_FILE_SUFFIXES = frozenset({".safetensors", ".json", ".txt", ".model", ".jinja"})


def _read(modelfile: Path) -> str:
    data = modelfile.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CLIError(f"the Modelfile {modelfile} is not UTF-8 text: {exc}") from None


def _local_path(value: str, folder: Path) -> Path | None:
    """The file or folder `value` names, relative to the Modelfile's folder; None when there is none."""
    path = Path(value).expanduser()
    path = path if path.is_absolute() else folder / path
    return path if path.exists() else None


def _model_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """(name relative to `folder`, path) of each file of a model folder a server needs."""
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and path.suffix in MODEL_FILE_SUFFIXES and not any(p.startswith(".") for p in relative.parts):
            yield relative.as_posix(), path


def modelfile_request(modelfile: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """The fields of an ``/api/create`` request for a Modelfile, and the files to upload first (digest -> path)."""
    parsed = parse_modelfile(_read(modelfile))
    folder = modelfile.resolve().parent
    uploads: dict[str, Path] = {}
    files: dict[str, str] = {}
    adapters: dict[str, str] = {}
    model_name: str | None = None

    def add(name: str, path: Path, into: dict[str, str]) -> None:
        digest = sha256_of(path)
        uploads[digest] = path
        into[name] = digest

    for value in parsed.froms:
        path = _local_path(value, folder)
        if path is None:
            model_name = value
        elif path.is_dir():
            for name, file in _model_files(path):
                add(name, file, files)
        else:
            add(path.name, path, files)
    for value in parsed.adapters:
        path = _local_path(value, folder)
        if path is None or not path.is_file():
            raise CLIError(f"ADAPTER {value}: no such file")
        add(path.name, path, adapters)
    fields = {
        "from": model_name,
        "files": files or None,
        "adapters": adapters or None,
        "template": parsed.template,
        "system": parsed.system,
        "parameters": parsed.parameters or None,
        "messages": list(parsed.messages) or None,
        "license": list(parsed.licenses) or None,
        "renderer": parsed.renderer,
        "parser": parsed.parser,
        "requires": parsed.requires,
    }
    return {name: value for name, value in fields.items() if value is not None}, uploads
