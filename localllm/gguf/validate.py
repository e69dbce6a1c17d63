"""Every GGUF file is checked here before llama.cpp sees it.

`validate_file` runs the structural parse (`parser.py`) and then the semantic checks: architecture, general
keys, hyperparameters and tensors (`metadata_checks.py`), the tokenizer (`tokenizer_checks.py`), and for a
multimodal projector the keys libmtmd reads (`projector_checks.py`).
`inspect.read_info` reuses the structural parse only.

`validate_once` remembers each verdict for one version of a file (device, inode, size, mtime), so a model
resolved for every request is read once; `sha256_once` does the same for a file's digest.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import TypeVar

from localllm.errors import InvalidModelFile
from localllm.files import open_regular
from localllm.gguf.metadata_checks import check_architecture, check_general, check_hparams, check_tensors
from localllm.gguf.parser import display_name, open_gguf, parse_bytes
from localllm.gguf.projector_checks import check_projector, is_projector
from localllm.gguf.structure import GGUF_MAGIC, HINT_CORRUPT, ParsedGGUF, StringArray
from localllm.gguf.tokenizer_checks import check_tokenizer

__all__ = [
    "GGUF_MAGIC",
    "StringArray",
    "is_gguf",
    "open_gguf",
    "remember_sha256",
    "sha256_once",
    "validate_bytes",
    "validate_file",
    "validate_once",
]


def check(parsed: ParsedGGUF) -> None:
    """The semantic checks on a structurally sound file."""
    arch = check_architecture(parsed)
    check_general(parsed)
    check_tokenizer(parsed)
    check_hparams(parsed, arch)
    check_tensors(parsed, arch)
    if is_projector(parsed):
        check_projector(parsed)


# ----------------------------------------------------------------------------------------------------------------
# Public API


def validate_file(path: str | os.PathLike[str]) -> None:
    """Check that `path` is a GGUF model file llama.cpp can safely load; raise `InvalidModelFile` if not.

    Only the header, metadata and tensor descriptions are read (through a memory map); the tensor data is
    checked for placement, not content.
    """
    name = display_name(path)
    try:
        with open_gguf(path) as parsed:
            check(parsed)
    except InvalidModelFile:
        raise
    except Exception as exc:  # a bug here must not let a file through, nor escape as another type
        raise InvalidModelFile(
            f"{name}: the file could not be checked ({type(exc).__name__}: {exc}). {HINT_CORRUPT}"
        ) from exc


# One version of a file: a blob replaced or rewritten in place gets a new one. For a blob in the store this is
# its digest, plus the evidence that the file under that name has not changed since it was checked.
_FileVersion = tuple[int, int, int, int]  # device, inode, size, modification time (ns)

_VERSIONS_KEPT = 4096
# A file modified this recently could change again within one tick of the filesystem's clock (coarse: up to 2 s
# on FAT) without its version changing, so nothing learnt from reading it is kept yet.
_SETTLED_NS = 2_000_000_000
_verdicts: dict[_FileVersion, str | None] = {}  # None: valid; else why not, without the file's name
_digests: dict[_FileVersion, str] = {}  # "sha256:<hex>" of the bytes
_memo_lock = threading.Lock()
_Learnt = TypeVar("_Learnt")
_HASH_CHUNK = 1 << 20


def _file_version(path: str | os.PathLike[str]) -> _FileVersion | None:
    """The version of the file at `path`, or None if it cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def validate_once(path: str | os.PathLike[str]) -> None:
    """`validate_file`, remembered for the life of the process: each version of a file is read once.

    Resolving a model for every request then costs a stat. A failure is remembered too, and raised again naming
    `path`. A file that changed while it was read, or shortly before, is read again next time.
    """
    name = display_name(path)
    before = _file_version(path)
    if before is not None:
        with _memo_lock:
            known, reason = before in _verdicts, _verdicts.get(before)
        if known and reason is None:
            return
        if known:
            raise InvalidModelFile(f"{name}: {reason}")
    try:
        validate_file(path)
    except InvalidModelFile as exc:
        _remember(_verdicts, path, before, str(exc).removeprefix(f"{name}: "))
        raise
    _remember(_verdicts, path, before, None)


def sha256_once(path: str | os.PathLike[str]) -> str:
    """The sha256 of the file at `path` as ``sha256:<hex>``, read once per version of the file (as `validate_once`).

    A blob whose bytes are checked against its name on every use then costs a stat, and one changed in place is
    read again. OSError if the file cannot be read.
    """
    before = _file_version(path)
    with _memo_lock:
        known = _digests.get(before) if before is not None else None
    if known is not None:
        return known
    digest = hashlib.sha256()
    with open_regular(path) as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    found = "sha256:" + digest.hexdigest()
    _remember(_digests, path, before, found)
    return found


def remember_sha256(path: str | os.PathLike[str], digest: str) -> None:
    """Record that the file at `path`, as it is now, hashes to `digest` (its writer hashed it as it wrote it)."""
    _remember(_digests, path, _file_version(path), digest)


def _remember(
    memo: dict[_FileVersion, _Learnt], path: str | os.PathLike[str], version: _FileVersion | None, learnt: _Learnt
) -> None:
    if version is None or _file_version(path) != version or time.time_ns() - version[3] < _SETTLED_NS:
        return
    with _memo_lock:
        memo[version] = learnt
        if len(memo) > _VERSIONS_KEPT:
            del memo[next(iter(memo))]  # the oldest


def validate_bytes(
    data: bytes | bytearray | memoryview, *, name: str = "<bytes>", file_size: int | None = None
) -> None:
    """Like `validate_file`, for a file held in memory.

    `data` may be only the start of a file of `file_size` bytes, as long as it holds the whole header,
    metadata and tensor descriptions: tensor data is never read, only its placement inside `file_size`.
    """
    try:
        check(parse_bytes(data, name, file_size))
    except InvalidModelFile:
        raise
    except Exception as exc:
        raise InvalidModelFile(
            f"{name}: the data could not be checked ({type(exc).__name__}: {exc}). {HINT_CORRUPT}"
        ) from exc


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether the file at `path` starts with the GGUF magic (a cheap test, not a validation)."""
    try:
        with open_regular(path) as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False
