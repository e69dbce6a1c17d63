"""The on-disk model store, in Ollama's layout so one folder can serve both.

::

    <root>/blobs/sha256-<64 hex>                         content-addressed files
    <root>/blobs/sha256-<64 hex>-partial                 a download in progress
    <root>/manifests/<host>/<namespace>/<model>/<tag>    docker v2 manifests (JSON)

Blobs are written to a temporary file in ``blobs/`` while they are hashed and
reach their real name only by an atomic rename once the digest is known, so a
crash never leaves a half-written blob under a real name. Files are copied in,
never linked, so no file outside the store shares a blob's bytes. A blob's
bytes are checked against its name once per version of its file, and a blob
that fails is replaced by the next write of the true bytes. Manifests are
replaced atomically too, and `BlobStore.lock` makes "these blobs are present,
write the manifest naming them" one step that no removal of blobs can split.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from .. import gojson
from ..errors import BlobTooLarge, DigestMismatch, InvalidModelFile, InvalidRequest, LocalLLMError, ModelNotFound
from ..files import open_regular
from .names import ModelName

__all__ = [
    "GGUF_MEDIA_TYPES",
    "MEDIA_ADAPTER",
    "MEDIA_CONFIG",
    "MEDIA_LICENSE",
    "MEDIA_MANIFEST",
    "MEDIA_MESSAGES",
    "MEDIA_MODEL",
    "MEDIA_PARAMS",
    "MEDIA_PROJECTOR",
    "MEDIA_SYSTEM",
    "MEDIA_TEMPLATE",
    "BlobStore",
    "BlobWriter",
    "Layer",
    "Manifest",
    "go_json",
    "normalize_digest",
]

log = logging.getLogger("localllm.registry")

MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_MESSAGES = "application/vnd.ollama.image.messages"
MEDIA_LICENSE = "application/vnd.ollama.image.license"
MEDIA_ADAPTER = "application/vnd.ollama.image.adapter"
MEDIA_PROJECTOR = "application/vnd.ollama.image.projector"
#: The layers that are GGUF files llama.cpp loads, and what each one is.
GGUF_MEDIA_TYPES = {MEDIA_MODEL: "model file", MEDIA_ADAPTER: "LoRA adapter", MEDIA_PROJECTOR: "projector"}

_DIGEST_RE = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")
_BLOB_NAME_RE = re.compile(r"sha256-[0-9a-f]{64}")
_ANY_DIGEST_RE = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")
_TEMP_PREFIX = ".localllm-tmp-"
_CHUNK = 1 << 20
_REPLACE_IT = "delete the model and pull or create it again"


def normalize_digest(digest: str) -> str:
    """Return ``sha256:<lowercase hex>``; raise LocalLLMError for anything else."""
    if not isinstance(digest, str):
        raise LocalLLMError(f"a blob digest must be a string like 'sha256:<64 hex digits>', got {digest!r}")
    match = _DIGEST_RE.fullmatch(digest)
    if match is None:
        raise LocalLLMError(f"invalid blob digest {digest!r}: expected 'sha256:' followed by 64 hex digits")
    return "sha256:" + match.group(1).lower()


def go_json(value: Any) -> bytes:
    """Encode like Go's json.Encoder: Go's JSON with a trailing newline, as UTF-8.

    The dicts written here stand for Go structs, so their keys stay in the order they were written.
    """
    try:
        text = gojson.go_json(value, sort_keys=False)
    except ValueError as exc:  # Go refuses to write NaN and the infinities too
        raise InvalidRequest(f"{exc} (JSON has no form for NaN or the infinities)") from None
    return (text + "\n").encode("utf-8")


# --------------------------------------------------------------------------- manifests


@attrs.frozen
class Layer:
    """One entry of a manifest: a blob and what it holds."""

    media_type: str
    digest: str = attrs.field(converter=normalize_digest)
    size: int
    from_: str | None = None
    #: Ollama's optional per-layer name (tensor layers); kept so manifests round-trip.
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.from_:
            data["from"] = self.from_
        if self.name:
            data["name"] = self.name
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Layer:
        if not isinstance(data, Mapping):
            raise LocalLLMError(f"a manifest layer must be an object, got {type(data).__name__}")
        try:
            media_type = data["mediaType"]
            digest = data["digest"]
            size = data["size"]
        except KeyError as exc:
            raise LocalLLMError(f"a manifest layer lacks the field {exc.args[0]!r}") from None
        if not isinstance(media_type, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise LocalLLMError(f"a manifest layer has a bad mediaType or size: {dict(data)!r}")
        from_ = data.get("from") or None
        name = data.get("name") or None
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            from_=str(from_) if from_ is not None else None,
            name=str(name) if name is not None else None,
        )


def _layer_tuple(items: Iterable[Layer]) -> tuple[Layer, ...]:
    return tuple(items)


def _manifest_dict(schema_version: int, media_type: str, config: Layer, layers: Iterable[Layer]) -> dict[str, Any]:
    return {
        "schemaVersion": schema_version,
        "mediaType": media_type,
        "config": config.to_dict(),
        "layers": [layer.to_dict() for layer in layers],
    }


@attrs.frozen
class Manifest:
    """A docker v2 image manifest as Ollama writes it.

    `raw` keeps the exact bytes a manifest was read from (a pulled manifest
    keeps the registry's bytes, so its digest stays the registry's); it is
    dropped automatically when it no longer describes the fields.
    """

    config: Layer
    layers: tuple[Layer, ...] = attrs.field(default=(), converter=_layer_tuple)
    schema_version: int = 2
    media_type: str = MEDIA_MANIFEST
    raw: bytes | None = attrs.field(default=None, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.raw is not None:
            try:
                same = Manifest.from_json(self.raw, keep_raw=False) == self
            except LocalLLMError:
                same = False
            if not same:
                object.__setattr__(self, "raw", None)

    def to_json(self) -> bytes:
        """The manifest as bytes: the bytes it was read from, or Go-style compact JSON."""
        if self.raw is not None:
            return self.raw
        return go_json(_manifest_dict(self.schema_version, self.media_type, self.config, self.layers))

    @classmethod
    def from_json(cls, data: bytes | str, *, keep_raw: bool = True) -> Manifest:
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise LocalLLMError(f"a manifest is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise LocalLLMError("a manifest must be a JSON object")
        if "config" not in obj:
            raise LocalLLMError("a manifest lacks its 'config' entry")
        layers = obj.get("layers") or []
        if not isinstance(layers, list):
            raise LocalLLMError("a manifest's 'layers' must be a list")
        schema = obj.get("schemaVersion", 2)
        media = obj.get("mediaType", MEDIA_MANIFEST)
        if not isinstance(schema, int) or not isinstance(media, str):
            raise LocalLLMError("a manifest has a bad schemaVersion or mediaType")
        return cls(
            config=Layer.from_dict(obj["config"]),
            layers=tuple(Layer.from_dict(layer) for layer in layers),
            schema_version=schema,
            media_type=media,
            raw=raw if keep_raw else None,
        )

    @property
    def digest(self) -> str:
        """The sha256 (hex) of the manifest's bytes, as ``ollama list`` shows it."""
        return hashlib.sha256(self.to_json()).hexdigest()

    @property
    def size(self) -> int:
        """Total size of the config and all layers, in bytes."""
        return self.config.size + sum(layer.size for layer in self.layers)

    @property
    def digests(self) -> tuple[str, ...]:
        """Every blob the manifest references, config first."""
        return (self.config.digest, *(layer.digest for layer in self.layers))

    def layers_of(self, media_type: str) -> tuple[Layer, ...]:
        return tuple(layer for layer in self.layers if layer.media_type == media_type)

    def layer_of(self, media_type: str) -> Layer | None:
        """The last layer of `media_type`, if any."""
        found = self.layers_of(media_type)
        return found[-1] if found else None


# --------------------------------------------------------------------------- the store


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_store_locks: dict[Path, threading.RLock] = {}
_store_locks_guard = threading.Lock()


def _store_lock(root: Path) -> threading.RLock:
    """The lock of the store in `root`: every BlobStore over one folder in this process shares it."""
    with _store_locks_guard:
        return _store_locks.setdefault(root.resolve(), threading.RLock())


class BlobWriter:
    """One blob on its way into a store: written to a temporary file while it is hashed, renamed by `commit`.

    Use it as a context manager: leaving the block without a commit (an error, a
    client gone) removes the temporary file, so a half blob never has a real name.
    """

    def __init__(self, store: BlobStore, *, expected: str | None = None, max_size: int | None = None) -> None:
        self._store = store
        self._expected = normalize_digest(expected) if expected is not None else None
        self._max_size = max_size
        self._hash = hashlib.sha256()
        #: Bytes written so far.
        self.size = 0
        self._path = store.temp_path()
        self._file = open(self._path, "xb")

    def write(self, data: bytes) -> None:
        """Append `data`; BlobTooLarge once the blob would pass `max_size`."""
        if self._max_size is not None and self.size + len(data) > self._max_size:
            raise BlobTooLarge(limit=self._max_size)
        self._hash.update(data)
        self._file.write(data)
        self.size += len(data)

    def commit(self, *, modified_ns: int | None = None) -> str:
        """Give the blob its real name and return its digest; DigestMismatch if it is not the one expected.

        `modified_ns` dates the blob (a copy keeps its source's modification time).
        """
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        digest = "sha256:" + self._hash.hexdigest()
        if self._expected is not None and digest != self._expected:
            raise DigestMismatch(expected=self._expected, actual=digest)
        if modified_ns is not None:
            os.utime(self._path, ns=(time.time_ns(), modified_ns))
        self._store._install(self._path, digest)
        return digest

    def discard(self) -> None:
        """Remove the temporary file (once committed there is none left)."""
        self._file.close()
        self._path.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()


class BlobStore:
    """Blobs and manifests under one root folder (``~/.ollama/models`` works as is)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()
        self.blobs_dir = self.root / "blobs"
        self.manifests_dir = self.root / "manifests"
        #: Held from the check that a manifest's blobs are present until the manifest is written, and while
        #: blobs are removed, so no removal takes a blob that a manifest is about to name. Reentrant.
        self.lock = _store_lock(self.root)
        self._file_locks_guard = threading.Lock()
        self._file_locks: dict[tuple[int, int], threading.Lock] = {}
        # (device, inode, size, mtime_ns) of files already added -> digest
        self._added: dict[tuple[int, int, int, int], str] = {}

    # ---- blobs

    def blob_path(self, digest: str) -> Path:
        """``blobs/sha256-<hex>`` for ``sha256:<hex>`` (validates the digest)."""
        return self.blobs_dir / normalize_digest(digest).replace(":", "-")

    def has_blob(self, digest: str) -> bool:
        """Whether the store holds `digest` with bytes that still hash to it.

        The bytes are read once per version of the file (a stat after that): a blob changed in place, even to
        the same size, is not trusted, and the next create, pull or upload of the true bytes replaces it.
        """
        from ..gguf.validate import sha256_once

        try:
            return sha256_once(self.blob_path(digest)) == normalize_digest(digest)
        except OSError:  # missing, or not a file
            return False

    def partial_path(self, digest: str) -> Path:
        """Where a resumable download of `digest` keeps its bytes."""
        return self.blobs_dir / (normalize_digest(digest).replace(":", "-") + "-partial")

    def temp_path(self) -> Path:
        """A new name for a temporary file in ``blobs/`` (prune removes any a crash leaves behind)."""
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        return self.blobs_dir / f"{_TEMP_PREFIX}{secrets.token_hex(8)}"

    def blob_writer(self, *, expected: str | None = None, max_size: int | None = None) -> BlobWriter:
        """A writer of one new blob: `expected` is the digest its bytes must have, `max_size` their limit."""
        return BlobWriter(self, expected=expected, max_size=max_size)

    def _install(self, temp: Path, digest: str) -> Path:
        """Give `temp`, whose bytes were hashed to `digest` as they were written, its real name.

        It replaces whatever is there: bytes just hashed are known good, those already there are not (a reader
        holding the old file keeps it). The digest of the new file is remembered, so its first use reads it
        again only if it is too fresh to tell a later change from it.
        """
        from ..gguf.validate import remember_sha256

        final = self.blob_path(digest)
        os.replace(temp, final)
        _fsync_dir(self.blobs_dir)
        remember_sha256(final, digest)
        return final

    def commit_partial(self, digest: str) -> Path:
        """Hash the finished partial download of `digest`; move it into place or delete it and raise."""
        digest = normalize_digest(digest)
        partial = self.partial_path(digest)
        if not partial.is_file():
            raise LocalLLMError(f"no partial download of {digest} to commit")
        # Move it aside first so a concurrent writer can no longer append while we hash.
        temp = self.temp_path()
        os.replace(partial, temp)
        try:
            actual = _hash_file(temp)
            if actual != digest:
                raise DigestMismatch(
                    f"downloaded blob has digest {actual}, expected {digest}; the download was discarded",
                    expected=digest,
                    actual=actual,
                )
            return self._install(temp, digest)
        finally:
            temp.unlink(missing_ok=True)

    def _file_lock(self, key: tuple[int, int]) -> threading.Lock:
        with self._file_locks_guard:
            lock = self._file_locks.get(key)
            if lock is None:
                lock = self._file_locks[key] = threading.Lock()
            return lock

    def add_file(self, path: Path, *, progress: Callable[[int, int], None] | None = None) -> str:
        """Add a copy of a file's content as a blob and return its digest.

        The store never shares bytes with a file outside it: a hard link would let an edit of the file change
        the blob under its old name. The copy goes through `blob_writer` (hashed on the way, renamed into place)
        and keeps the file's modification time, as ``cp -p`` does, so a file that has settled needs no second
        read to be trusted. `progress`, if given, is called with (bytes done, total bytes). Adding the same
        file from several threads copies it once. Files of the store itself are not copied: a blob (an upload)
        is checked, and a temporary file (a conversion's or quantization's output) is hashed and renamed.
        """
        path = Path(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise LocalLLMError(f"no such file: {path}") from None
        if not path.is_file():
            raise LocalLLMError(f"not a regular file: {path}")
        own = self._own_blob(path)
        if own is not None:
            if not self.has_blob(own):
                raise InvalidModelFile(
                    f"blob {own} is damaged: its bytes no longer match their sha256; upload it again"
                )
            if progress is not None:
                progress(st.st_size, st.st_size)
            return own
        if self._is_temp(path):
            digest = _hash_file(path, progress=progress, total=st.st_size)
            self._install(path, digest)
            return digest
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._file_lock((st.st_dev, st.st_ino)):
            known = self._added.get(identity)
            if known is not None and self.has_blob(known):
                if progress is not None:
                    progress(st.st_size, st.st_size)
                return known
            digest = self._add_file(path, st, progress=progress)
            after = path.stat()
            if (after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns) == identity:  # unchanged while copied
                self._added[identity] = digest
            return digest

    def _own_blob(self, path: Path) -> str | None:
        """The digest of `path` if it is one of this store's blobs."""
        if not _BLOB_NAME_RE.fullmatch(path.name) or path.resolve().parent != self.blobs_dir.resolve():
            return None
        return normalize_digest(path.name)

    def _is_temp(self, path: Path) -> bool:
        """Whether `path` is a temporary file of this store (see `temp_path`): nothing outside the store has it."""
        return path.name.startswith(_TEMP_PREFIX) and path.resolve().parent == self.blobs_dir.resolve()

    def _add_file(self, path: Path, st: os.stat_result, *, progress: Callable[[int, int], None] | None) -> str:
        with self.blob_writer() as out, open_regular(path) as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                if progress is not None:
                    progress(out.size, max(st.st_size, out.size))
            return out.commit(modified_ns=st.st_mtime_ns)

    def add_bytes(self, data: bytes) -> str:
        """Add `data` as a blob and return its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self.has_blob(digest):
            return digest
        with self.blob_writer(expected=digest) as out:
            out.write(data)
            return out.commit()

    def read_blob(self, digest: str) -> bytes:
        """The bytes of blob `digest`; LocalLLMError if it is missing, InvalidModelFile if they no longer hash to it."""
        digest = normalize_digest(digest)
        try:
            data = self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise LocalLLMError(f"blob {digest} is missing from the store") from None
        except OSError as exc:
            raise LocalLLMError(f"blob {digest} cannot be read ({exc.strerror})") from None
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise InvalidModelFile(f"blob {digest} is damaged: its bytes no longer match their sha256")
        return data

    # ---- names

    def resolve_name(self, name: ModelName) -> ModelName:
        """`name` spelled as the store already spells it, part by part (case-insensitively).

        Parts that match nothing on disk keep the given spelling, so a new tag of
        an existing model lands in that model's folder whatever its case.
        """
        folder = self.manifests_dir
        spelled: list[str] = []
        for part in name.parts:
            chosen = part
            try:
                entries = os.listdir(folder)
            except OSError:
                entries = []
            if part not in entries:
                folded = part.lower()
                for entry in sorted(entries):
                    if entry.lower() == folded:
                        chosen = entry
                        break
            spelled.append(chosen)
            folder = folder / chosen
        return name.with_spelling((spelled[0], spelled[1], spelled[2], spelled[3]))

    def manifest_path(self, name: ModelName) -> Path:
        return self.manifests_dir / self.resolve_name(name).manifest_relpath

    def has_manifest(self, name: ModelName) -> bool:
        return self.manifest_path(name).is_file()

    # ---- manifests

    def read_manifest(self, name: ModelName) -> Manifest:
        """The manifest of `name` (matched case-insensitively).

        ModelNotFound if there is none; InvalidModelFile, naming the model, if it cannot be read or is damaged.
        """
        path = self.manifest_path(name)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ModelNotFound(model=name.display) from None
        except OSError as exc:
            raise InvalidModelFile(
                f"the manifest of model '{name.display}' cannot be read ({exc.strerror}); {_REPLACE_IT}"
            ) from None
        try:
            return Manifest.from_json(data)
        except LocalLLMError as exc:
            raise InvalidModelFile(
                f"the manifest of model '{name.display}' is damaged ({exc}); {_REPLACE_IT}"
            ) from None

    def manifest_digests(self, name: ModelName) -> set[str]:
        """Every digest the manifest of `name` names, damaged or not; none when there is no manifest."""
        try:
            return _digests_in(self.manifest_path(name).read_bytes())
        except OSError:
            return set()

    def manifest_mtime(self, name: ModelName) -> float:
        try:
            return self.manifest_path(name).stat().st_mtime
        except FileNotFoundError:
            raise ModelNotFound(model=name.display) from None

    def write_manifest(self, name: ModelName, manifest: Manifest) -> None:
        """Write (or atomically replace) the manifest of `name`."""
        path = self.manifest_path(name)
        data = manifest.to_json()
        for attempt in range(3):
            path.parent.mkdir(parents=True, exist_ok=True)
            temp = path.parent / f"{_TEMP_PREFIX}{secrets.token_hex(8)}"
            try:
                with open(temp, "xb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temp, path)
                break
            except FileNotFoundError:
                # a concurrent prune removed the (then empty) folder; make it again
                if attempt == 2:
                    raise
            finally:
                temp.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    def commit_manifest(self, name: ModelName, manifest: Manifest) -> None:
        """Write (or replace) the manifest of `name`, then remove the blobs only the replaced one used.

        Hold `lock` from the check that the manifest's blobs are present until this returns.
        """
        with self.lock:
            replaced = self.manifest_digests(name)
            self.write_manifest(name, manifest)
            self.remove_blobs(replaced - set(manifest.digests))

    def delete_manifest(self, name: ModelName) -> None:
        """Remove the manifest of `name` and the folders it leaves empty; ModelNotFound if absent."""
        path = self.manifest_path(name)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ModelNotFound(model=name.display) from None
        folder = path.parent
        while folder != self.manifests_dir and self.manifests_dir in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent

    def _manifest_files(self) -> list[tuple[Path, tuple[str, str, str, str]]]:
        found: list[tuple[Path, tuple[str, str, str, str]]] = []
        if not self.manifests_dir.is_dir():
            return found
        for path in self.manifests_dir.glob("*/*/*/*"):
            if path.name.startswith(_TEMP_PREFIX) or not path.is_file():
                continue
            rel = path.relative_to(self.manifests_dir).parts
            found.append((path, (rel[0], rel[1], rel[2], rel[3])))
        return found

    def list_manifests(self) -> list[tuple[ModelName, Manifest, float]]:
        """Every readable manifest with its name and modification time; damaged ones are logged and skipped."""
        result: list[tuple[ModelName, Manifest, float]] = []
        for path, parts in self._manifest_files():
            try:
                name = ModelName.from_parts(*parts)
            except LocalLLMError:
                log.warning("skipping manifest with an invalid name: %s", path)
                continue
            try:
                data = path.read_bytes()
                mtime = path.stat().st_mtime
                manifest = Manifest.from_json(data)
            except (OSError, LocalLLMError) as exc:
                log.warning("skipping unreadable manifest %s: %s", path, exc)
                continue
            result.append((name, manifest, mtime))
        return result

    def referenced_digests(self) -> set[str]:
        """Every digest any manifest refers to. Damaged manifests count by every digest they mention."""
        used: set[str] = set()
        for path, _ in self._manifest_files():
            with contextlib.suppress(OSError):
                used.update(_digests_in(path.read_bytes()))
        return used

    def remove_blobs(self, digests: Iterable[str]) -> list[str]:
        """Remove those of `digests` no manifest references; return the ones removed."""
        with self.lock:
            used = self.referenced_digests()
            removed: list[str] = []
            for digest in dict.fromkeys(normalize_digest(d) for d in digests):
                if digest in used:
                    continue
                try:
                    self.blob_path(digest).unlink()
                except FileNotFoundError:
                    continue
                removed.append(digest)
            return removed

    def prune(self, *, grace: float = 0.0) -> list[str]:
        """Remove unreferenced blobs and leftover partial/temporary files; return their file names.

        Files modified less than `grace` seconds ago are kept: pass a grace period when a download or an upload
        may be running (creates and the last step of pulls hold `lock`, as this does).
        """
        with self.lock:
            removed: list[str] = []
            if not self.blobs_dir.is_dir():
                return removed
            used = {d.replace(":", "-") for d in self.referenced_digests()}
            now = time.time()
            for entry in sorted(os.scandir(self.blobs_dir), key=lambda e: e.name):
                if not entry.is_file(follow_symlinks=False):
                    continue
                if _BLOB_NAME_RE.fullmatch(entry.name) and entry.name in used:
                    continue
                try:
                    if grace > 0 and now - entry.stat(follow_symlinks=False).st_mtime < grace:
                        continue
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                removed.append(entry.name)
            self._prune_manifest_dirs(now, grace)
            return removed

    def _prune_manifest_dirs(self, now: float, grace: float) -> None:
        if not self.manifests_dir.is_dir():
            return
        for folder, _dirs, files in sorted(os.walk(self.manifests_dir), key=lambda t: -len(t[0])):
            for file in files:
                if file.startswith(_TEMP_PREFIX):
                    temp = Path(folder, file)
                    with contextlib.suppress(OSError):
                        if grace <= 0 or now - temp.stat().st_mtime >= grace:
                            temp.unlink()
            if Path(folder) == self.manifests_dir:
                continue
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def _digests_in(data: bytes) -> set[str]:
    """The digests a manifest's bytes name; of a damaged one, every digest it mentions."""
    try:
        return set(Manifest.from_json(data).digests)
    except LocalLLMError:
        text = data.decode("utf-8", "replace")
        return {"sha256:" + hexpart.lower() for hexpart in _ANY_DIGEST_RE.findall(text)}


def _hash_file(path: Path, *, progress: Callable[[int, int], None] | None = None, total: int = 0) -> str:
    digest = hashlib.sha256()
    done = 0
    with open_regular(path) as src:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, max(total, done))
    return "sha256:" + digest.hexdigest()
