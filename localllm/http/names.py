"""What a request may name: models by their names; files on the server only when the server allows it.

The Engine, for the library and the command line, takes a path wherever it takes
a model. Over HTTP that would let any client read the server's files, or block
a worker on a FIFO or ``/dev/zero``. So the shim checks every model and file a
request names before the Engine sees it: files reach the server as blobs
(``/api/blobs/<digest>``) named by digest, as in Ollama; a path is refused with a
message that depends on the text alone (it never tells whether the file exists),
unless the app allows local paths, and even then only regular files pass.

A valid name can also be a relative path (``Documents/notes/todo.txt`` parses as
host/namespace/model), which the Engine falls back to when no such model is
stored. So a name that is also a file in the server's working folder must be a
stored model, or it is answered as a model that is not there.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import anyio.to_thread
import attrs

from ..errors import InvalidModelName, ModelfileError, ModelNotFound
from ..parsing import Modelfile, ModelName, parse_modelfile
from .common import APIError

__all__ = [
    "checked_modelfile",
    "looks_like_path",
    "model_name",
    "model_to_build_on",
    "model_to_run",
]

# The longest file name most file systems take; each part of a name becomes one in the store.
_LONGEST_PART = 255

_UPLOAD = "upload the file to /api/blobs/<digest> and create a model from its digest"


def looks_like_path(text: str) -> bool:
    """Absolute, relative to a folder or a home, Windows-style, or a GGUF file's name."""
    return (
        text.startswith(("/", ".", "~"))
        or "\\" in text
        or (len(text) > 1 and text[1] == ":" and text[0].isalpha() and text[2:3] in ("", "/", "\\"))
        or text.lower().endswith(".gguf")
    )


def _invalid(field: str, problem: str) -> APIError:
    return APIError(400, f"invalid value for '{field}': {problem}", param=field)


def _not_found(text: str) -> ModelNotFound:
    # Worded as the Engine words a model that is not stored, so both read the same.
    message = f"model '{text}' not found; pull it or create it from a GGUF file or a Modelfile first"
    return ModelNotFound(message, model=text)


def model_name(text: str, field: str = "model") -> ModelName:
    """`text` as a model name; 400 naming `field` when it is not one."""
    try:
        name = ModelName.parse(text)
    except InvalidModelName as exc:
        raise _invalid(field, str(exc)) from None
    if any(len(part) > _LONGEST_PART for part in name.parts):
        raise _invalid(field, f"a part of the model name is longer than {_LONGEST_PART} characters")
    return name


def _name_not_path(text: str, field: str) -> ModelName:
    if looks_like_path(text):
        raise _invalid(field, f"'{text}' is a path; the server takes model names here ({_UPLOAD})")
    return model_name(text, field)


async def _mode(text: str) -> int | None:
    """The file type at `text` read as a path (from the server's working folder): None when nothing is there."""

    def look() -> int | None:
        try:
            return os.stat(os.path.expanduser(text)).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError):
            return 0  # something is there the Engine would stumble on: treat it as no regular file

    return await anyio.to_thread.run_sync(look)


async def _regular_file_or_nothing(text: str, field: str) -> None:
    mode = await _mode(text)
    if mode is not None and not stat.S_ISREG(mode):
        raise _invalid(field, f"'{text}' is not a regular file")


async def _is_stored(engine: Any, name: ModelName) -> bool:
    return any(ModelName.parse(entry.name) == name for entry in (await engine.list()).models)


async def model_to_run(engine: Any, text: str, field: str = "model", *, allow_local_paths: bool) -> str:
    """A model to run or show: a name, or (when allowed) the path of a regular file."""
    if allow_local_paths and (looks_like_path(text) or await _mode(text) is not None):
        await _regular_file_or_nothing(text, field)
        return text
    name = _name_not_path(text, field)
    if await _mode(text) is not None and not await _is_stored(engine, name):
        raise _not_found(text)  # the Engine would fall back to that file
    return text


async def checked_options(engine: Any, options: Any, field: str = "options", *, allow_local_paths: bool) -> Any:
    """Options whose `draft_model` (a model, like `model`) passed the checks above."""
    if isinstance(options, dict) and isinstance(draft := options.get("draft_model"), str) and draft:
        await model_to_run(engine, draft, f"{field}.draft_model", allow_local_paths=allow_local_paths)
    return options


async def model_to_build_on(engine: Any, text: str, field: str = "from", *, allow_local_paths: bool) -> str:
    """What a model is created from (``from``, a Modelfile's FROM): a stored model, or (when allowed) a regular file.

    A stored model is passed on by its full name (``host/namespace/model:tag``):
    the Engine prefers a file of the same name, and that one is unlikely to exist.
    """
    if allow_local_paths and (looks_like_path(text) or await _mode(text) is not None):
        await _regular_file_or_nothing(text, field)
        return text
    name = _name_not_path(text, field)
    full = str(name)
    if not await _is_stored(engine, name) or await _mode(full) is not None:
        raise _not_found(text)
    return full


async def _adapter_file(text: str, field: str, *, allow_local_paths: bool) -> str:
    if not allow_local_paths:
        raise _invalid(
            field,
            "ADAPTER cannot name a file on the server; upload the adapter to /api/blobs/<digest>"
            " and list it in 'adapters'",
        )
    await _regular_file_or_nothing(text, field)
    return text


async def checked_modelfile(engine: Any, text: str, field: str = "modelfile", *, allow_local_paths: bool) -> Modelfile:
    """Modelfile text whose FROM and ADAPTER lines passed the checks above (FROM names written in full)."""
    try:
        modelfile = parse_modelfile(text)
    except ModelfileError as exc:
        raise _invalid(field, str(exc)) from None
    checked = []
    for instruction in modelfile.instructions:
        value = instruction.value
        if instruction.name == "from":
            value = await model_to_build_on(engine, value, field, allow_local_paths=allow_local_paths)
        elif instruction.name == "adapter":
            value = await _adapter_file(value, field, allow_local_paths=allow_local_paths)
        elif instruction.name == "parameter" and instruction.key == "draft_model" and value:
            value = await model_to_run(engine, value, field, allow_local_paths=allow_local_paths)
        checked.append(attrs.evolve(instruction, value=value))
    return Modelfile(tuple(checked))
