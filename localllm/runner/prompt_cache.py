"""Saved KV states of finished sequences, found again by the token prefix a new prompt shares with them.

The runner saves a sequence's state (opaque bytes from llama.cpp) with the tokens it holds before the slot
is reused; a later prompt that starts with those tokens restores the state and evaluates only the rest.

Entries are found through block hashes: the tokens are cut into blocks of `block_size`, and each whole
block gets a chain hash (the previous block's hash + this block's tokens), so equal hashes mean equal
prefixes. An index from hash to entries lets `lookup` walk a prompt's chain and stop at the deepest block
some entry shares. One more hash, of the first `min_tokens` tokens (the "head"), is shared by every
possible hit, so it rules out most misses at once and finds shared prefixes shorter than a block. Hashes
only propose candidates; the tokens themselves decide.

States live in RAM up to `max_bytes` (least recently used dropped first) and, with a `directory`, also on
disk, one file per entry, so they outlive the process. Disk trouble never raises: the cache logs it and
works on from RAM.

A file on disk is trusted only if this engine wrote it: each one carries HMAC-SHA256 tags made with a
secret key kept in the engine's home (`key_file`, 32 random bytes, created 0600 on first use). A hash
proves a file intact, not who wrote it; without the key nobody can make a file this cache restores,
and entries copied from another home (another key) are ignored and removed. Only regular files are
opened, header sizes are bounded before anything is read, and temporary files carry their writer's
pid, so several processes can share one folder: a leftover temporary file is removed at start only when
the process that wrote it is gone.

File format (little-endian): `MAGIC`, uint32 format version, uint32 header length, uint32 token count,
the 32-byte header tag, the header as UTF-8 JSON (`key`, `state_bytes`, `state_mac`), the tokens as
int32s, then exactly `state_bytes` bytes of state. The header tag is an HMAC over everything before the
state but the tag itself; `state_mac` is an HMAC over the state. Files are named
`<blake2b(key, tokens)>.kvcache` and written through a hidden temp file
(`.<name>.<pid>.<random>.tmp`) that is renamed into place, so a real name never holds half a file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import struct
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import attrs

from ..files import open_regular

__all__ = ["CacheHit", "PromptCache", "load_key"]

logger = logging.getLogger("localllm.runner")

MAGIC = b"localllm-kv\0"
FORMAT_VERSION = 2
_PREAMBLE = struct.Struct("<III")  # format version, header length, token count
_TAG_BYTES = 32  # HMAC-SHA256
_SUFFIX = ".kvcache"
_TEMP_SUFFIX = ".tmp"
# Bounds checked before a byte of header is read, so a foreign file cannot make the scan read much: the
# JSON holds a key (a hex digest) and two numbers; 4M tokens is beyond any context llama.cpp loads today.
_MAX_HEADER_BYTES = 64 << 10
_MAX_TOKENS = 1 << 22
_KEY_BYTES = 32
_KEY_NAME = "prompt-cache.key"
_STATE_DOMAIN = b"localllm-kv-state\0"  # the state's MAC input starts here, the header tag's with MAGIC


@attrs.frozen
class CacheHit:
    """A saved state that holds the first `common` tokens of the prompt looked up."""

    tokens: tuple[int, ...]
    state: bytes
    common: int


@attrs.frozen
class _Hashes:
    """Where a token sequence sits in the index."""

    head: bytes | None  # key + the first `min_tokens` tokens (every hit shares them); None when there are fewer
    blocks: tuple[bytes, ...]  # the chain hash of each whole block

    @property
    def index_keys(self) -> tuple[bytes, ...]:
        return self.blocks if self.head is None else (self.head, *self.blocks)


@attrs.define(eq=False)
class _Entry:
    name: str  # hash of key + tokens: identity in the cache and the file's name
    key: str
    tokens: tuple[int, ...]
    hashes: _Hashes
    state: bytes | None = None  # set while the state is held in RAM


@attrs.frozen
class _Header:
    key: str
    tokens: tuple[int, ...]
    state_bytes: int
    state_mac: bytes
    offset: int  # where the state starts in the file


class _BadFile(Exception):
    """A cache file that must not be used: corrupt, truncated, foreign or unreadable."""


def _token_bytes(tokens: Sequence[int]) -> bytes:
    # Fixed little-endian int32, so file names mean the same on every machine.
    return struct.pack(f"<{len(tokens)}i", *tokens)


def _entry_name(key: str, tokens: Sequence[int]) -> str:
    digest = hashlib.blake2b(digest_size=32, person=b"localllm-name")
    encoded = key.encode()
    digest.update(struct.pack("<Q", len(encoded)))
    digest.update(encoded)
    digest.update(_token_bytes(tokens))
    return digest.hexdigest()


def _common_prefix(a: Sequence[int], b: Sequence[int], start: int = 0) -> int:
    """How many leading tokens `a` and `b` share, given that the first `start` are equal."""
    end = min(len(a), len(b))
    count = start
    while count < end and a[count] == b[count]:
        count += 1
    return count


def _state_mac(secret: bytes, state: bytes) -> bytes:
    return hmac.new(secret, _STATE_DOMAIN + state, hashlib.sha256).digest()


def _encode_header(secret: bytes, key: str, tokens: Sequence[int], state: bytes) -> bytes:
    fields = {"key": key, "state_bytes": len(state), "state_mac": _state_mac(secret, state).hex()}
    header = json.dumps(fields, separators=(",", ":")).encode()
    signed = MAGIC + _PREAMBLE.pack(FORMAT_VERSION, len(header), len(tokens))
    body = header + _token_bytes(tokens)
    tag = hmac.new(secret, signed + body, hashlib.sha256).digest()
    return signed + tag + body


def _read_header(stream: BinaryIO, secret: bytes) -> _Header:
    """Read and check a file's magic, version, tag and header, leaving `stream` at the state."""
    size = os.fstat(stream.fileno()).st_size
    fixed = len(MAGIC) + _PREAMBLE.size + _TAG_BYTES
    preamble = stream.read(len(MAGIC) + _PREAMBLE.size)
    if len(preamble) < len(MAGIC) + _PREAMBLE.size or not preamble.startswith(MAGIC):
        raise _BadFile("not a prompt cache file")
    version, length, count = _PREAMBLE.unpack_from(preamble, len(MAGIC))
    if version != FORMAT_VERSION:
        raise _BadFile(f"format version {version}, expected {FORMAT_VERSION}")
    if length > _MAX_HEADER_BYTES or count > _MAX_TOKENS:
        raise _BadFile(f"a header of {length} bytes and {count} tokens, beyond what this cache writes")
    offset = fixed + length + 4 * count
    if size < offset:
        raise _BadFile(f"{size} bytes, too short for its header")
    tag = stream.read(_TAG_BYTES)
    body = stream.read(length + 4 * count)
    if len(tag) != _TAG_BYTES or len(body) != length + 4 * count:
        raise _BadFile("truncated header")
    # Nothing is parsed before the tag is checked: only this engine's key makes a valid one.
    if not hmac.compare_digest(tag, hmac.new(secret, preamble + body, hashlib.sha256).digest()):
        raise _BadFile("not written with this engine's key")
    try:
        fields: object = json.loads(body[:length])
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise _BadFile(f"unreadable header ({exc})") from None
    if not isinstance(fields, dict):
        raise _BadFile("header is not an object")
    key, state_bytes, state_mac = fields.get("key"), fields.get("state_bytes"), fields.get("state_mac")
    if (
        not isinstance(key, str)
        or type(state_bytes) is not int
        or state_bytes < 0
        or not isinstance(state_mac, str)
        or len(state_mac) != 2 * _TAG_BYTES
    ):
        raise _BadFile("malformed header")
    try:
        mac = bytes.fromhex(state_mac)
    except ValueError:
        raise _BadFile("malformed header") from None
    tokens = struct.unpack(f"<{count}i", body[length:])
    return _Header(key, tokens, state_bytes, mac, offset)


def _read_state(entry: _Entry, path: Path, secret: bytes) -> bytes:
    """The state in `entry`'s file, checked against its header and against the index."""
    try:
        stream = open_regular(path)
    except OSError as exc:
        raise _BadFile(str(exc)) from None
    with stream:
        header = _read_header(stream, secret)
        if header.key != entry.key or header.tokens != entry.tokens:
            raise _BadFile("header does not match the indexed entry")
        state = stream.read(header.state_bytes + 1)
    if len(state) != header.state_bytes:
        raise _BadFile(f"{len(state)} bytes of state, header says {header.state_bytes}")
    if not hmac.compare_digest(_state_mac(secret, state), header.state_mac):
        raise _BadFile("state does not match its MAC")
    return state


def _temp_owner(filename: str) -> int | None:
    """The pid in a temp file's name (`.<name>.<pid>.<random>.tmp`); None if it has none."""
    parts = filename.split(".")
    if len(parts) >= 5 and parts[-3].isdigit():
        return int(parts[-3])
    return None


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (one of another user's counts: it may still be writing)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        return True  # os.kill would end it there: leave the file be
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:
        return True  # EPERM: another user's process
    return True


def load_key(path: Path) -> bytes:
    """The secret key in `path`, made there (0600, 32 random bytes) if there is none yet.

    OSError when it cannot be read or made, or when the file there is not a key only its owner can read:
    a key others can read or replace would let them write entries this cache trusts.
    """
    try:
        stream = open_regular(path)
    except FileNotFoundError:
        _create_key(path)
        stream = open_regular(path)  # what is in place now: ours, or a racing process's
    with stream:
        info = os.fstat(stream.fileno())
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise OSError(errno.EPERM, "the prompt cache key belongs to another user", str(path))
        if info.st_mode & 0o077:
            raise OSError(errno.EPERM, "the prompt cache key is readable by others; remove it", str(path))
        key = stream.read(_KEY_BYTES + 1)
    if len(key) != _KEY_BYTES:
        raise OSError(errno.EINVAL, f"not a prompt cache key ({len(key)} bytes); remove it", str(path))
    return key


def _create_key(path: Path) -> None:
    """Write a new key to `path`, unless another process's appears there first."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(secrets.token_bytes(_KEY_BYTES))
            stream.flush()
            os.fsync(stream.fileno())
        # A link never replaces a key another process made meanwhile, and the real name never holds half a key.
        os.link(temp, path)
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()


class PromptCache:
    """Saved sequence states by key and tokens, in RAM and optionally on disk; safe to share between threads.

    `key` names the model, its load options and llama.cpp's state format: entries of different keys never
    match. A hit must share at least `min_tokens` tokens with the prompt. Files in `directory` are signed
    with the secret in `key_file` (made on first use; by default `prompt-cache.key` in the directory itself,
    but an engine keeps it in its home, so that entries copied from elsewhere are never trusted).
    """

    def __init__(
        self,
        max_bytes: int,
        *,
        directory: Path | None = None,
        key_file: Path | None = None,
        max_disk_bytes: int | None = None,
        block_size: int = 64,
        min_tokens: int = 64,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, not {block_size}")
        if min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, not {min_tokens}")
        if max_disk_bytes is not None and max_disk_bytes < 0:
            raise ValueError(f"max_disk_bytes must be >= 0, not {max_disk_bytes}")
        self._max_bytes = max_bytes
        self._max_disk_bytes = max(4 * max_bytes, 1 << 30) if max_disk_bytes is None else max_disk_bytes
        self._block_size = block_size
        self._min_tokens = max(1, min_tokens)  # an empty shared prefix saves nothing
        self._lock = threading.Lock()
        self._closed = False
        self._entries: dict[str, _Entry] = {}
        self._index: dict[bytes, set[str]] = {}
        self._ram: OrderedDict[str, None] = OrderedDict()  # entries with their state in RAM, oldest use first
        self._ram_bytes = 0
        self._disk: OrderedDict[str, int] = OrderedDict()  # entries on disk -> file size, oldest use first
        self._disk_bytes = 0
        self._directory: Path | None = None
        self._secret = b""  # the key files are signed with, once a directory is in use
        self._writable = False
        if directory is not None:
            directory = Path(directory)
            self._open_directory(directory, Path(key_file) if key_file is not None else directory / _KEY_NAME)

    @property
    def min_tokens(self) -> int:
        """The fewest tokens worth saving, and the shortest prefix a hit shares."""
        return self._min_tokens

    @property
    def persistent(self) -> bool:
        """Whether states are being saved to disk, where they outlive the process."""
        return self._writable and not self._closed

    # -- the interface -------------------------------------------------------------------------------

    def put(self, key: str, tokens: Sequence[int], state: bytes) -> None:
        """Keep `state`, the saved state of a sequence holding `tokens`."""
        tokens = tuple(tokens)
        if len(tokens) < self._min_tokens:
            return
        hashes = self._hashes(key, tokens)
        with self._lock:
            if self._closed or self._covered(key, tokens, hashes):
                return
        entry = _Entry(_entry_name(key, tokens), key, tokens, hashes)
        # The file is written outside the lock: other threads keep looking up while a large state goes to disk.
        written = self._write_temp(entry, state)
        with self._lock:
            if self._closed or self._covered(key, tokens, hashes):
                if written is not None:
                    self._unlink(written[0])
                return
            on_disk = written is not None and self._commit(written[0], entry)
            in_ram = len(state) <= self._max_bytes
            if not (on_disk or in_ram):
                return
            # Only now, with the new entry kept somewhere, may the shorter ones it extends go.
            for old in self._extended_by(entry):
                self._forget(old)
            self._entries[entry.name] = entry
            for index_key in hashes.index_keys:
                self._index.setdefault(index_key, set()).add(entry.name)
            if on_disk and written is not None:
                self._disk[entry.name] = written[1]
                self._disk_bytes += written[1]
            if in_ram:
                self._keep_in_ram(entry, state)
            self._evict_disk()

    def lookup(self, key: str, prompt: Sequence[int]) -> CacheHit | None:
        """The entry sharing the longest prefix (at least `min_tokens`) with `prompt`, or None."""
        prompt = tuple(prompt)
        if len(prompt) < self._min_tokens:
            return None
        hashes = self._hashes(key, prompt)
        while True:
            with self._lock:
                if self._closed:
                    return None
                found = self._best(key, prompt, hashes)
                if found is None:
                    return None
                entry, common = found
                path = self._touch(entry)
                state = entry.state
            if state is None:
                assert path is not None  # an entry is held in RAM, on disk, or both
                # Read outside the lock: other threads go on while a large state comes off the disk.
                try:
                    state = _read_state(entry, path, self._secret)
                except (OSError, _BadFile) as exc:
                    with self._lock:
                        # Unless the entry left meanwhile (its name, and so its file, may be in use again).
                        if self._entries.get(entry.name) is entry:
                            logger.warning("prompt cache: discarding %s: %s", path, exc)
                            self._forget(entry)
                    continue  # the next best entry, if any
                with self._lock:
                    if self._closed:
                        return None
                    if self._entries.get(entry.name) is entry and entry.state is None:
                        self._keep_in_ram(entry, state)
            if path is not None:
                self._utime(path)
            return CacheHit(entry.tokens, state, common)

    def covers(self, key: str, tokens: Sequence[int]) -> bool:
        """Whether an entry already holds all of `tokens` (saving them again would change nothing)."""
        tokens = tuple(tokens)
        hashes = self._hashes(key, tokens)
        with self._lock:
            return not self._closed and self._covered(key, tokens, hashes)

    def drop(self, key: str, tokens: Sequence[int]) -> None:
        """Forget the entry saved for exactly `tokens`, and remove its file: its state failed to restore."""
        tokens = tuple(tokens)
        with self._lock:
            entry = self._entries.get(_entry_name(key, tokens))
            if entry is not None and entry.key == key and entry.tokens == tokens:
                logger.warning("prompt cache: dropping a saved state of %d tokens that failed to restore", len(tokens))
                self._forget(entry)

    def size_bytes(self, key: str | None = None) -> int:
        """Bytes of state held in RAM, for `key` or for all keys."""
        with self._lock:
            if key is None:
                return self._ram_bytes
            states = (self._entries[name].state for name in self._ram if self._entries[name].key == key)
            return sum(len(state) for state in states if state is not None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        """Let go of the RAM; files stay for the next cache over the same directory."""
        with self._lock:
            self._closed = True
            self._entries.clear()
            self._index.clear()
            self._ram.clear()
            self._ram_bytes = 0
            self._disk.clear()
            self._disk_bytes = 0

    def _hashes(self, key: str, tokens: Sequence[int]) -> _Hashes:
        """The index keys of `tokens` under `key` (a pure function: no lock needed)."""
        data = _token_bytes(tokens)
        seed = hashlib.blake2b(key.encode(), digest_size=16, person=b"localllm-key").digest()
        head = None
        if len(tokens) >= self._min_tokens:
            prefix = data[: 4 * self._min_tokens]
            head = hashlib.blake2b(seed + prefix, digest_size=16, person=b"localllm-head").digest()
        blocks = []
        chain = seed
        step = 4 * self._block_size
        for start in range(0, len(tokens) // self._block_size * step, step):
            chain = hashlib.blake2b(chain + data[start : start + step], digest_size=16, person=b"localllm-blk").digest()
            blocks.append(chain)
        return _Hashes(head, tuple(blocks))

    # -- the index (callers hold the lock) -----------------------------------------------------------

    def _candidates(self, index_key: bytes | None) -> list[_Entry]:
        if index_key is None:
            return list(self._entries.values())
        return [self._entries[name] for name in self._index.get(index_key, ())]

    def _covered(self, key: str, tokens: tuple[int, ...], hashes: _Hashes) -> bool:
        # An entry holding all of `tokens` holds their last whole block (or, short of one, their head).
        index_key = hashes.blocks[-1] if hashes.blocks else hashes.head
        count = len(tokens)
        return any(
            entry.key == key and len(entry.tokens) >= count and entry.tokens[:count] == tokens
            for entry in self._candidates(index_key)
        )

    def _extended_by(self, new: _Entry) -> list[_Entry]:
        """The entries whose tokens are a proper prefix of `new`'s: it makes them redundant."""
        count = len(new.tokens)
        return [
            entry
            for entry in self._candidates(new.hashes.head)
            if entry.key == new.key and len(entry.tokens) < count and new.tokens[: len(entry.tokens)] == entry.tokens
        ]

    def _best(self, key: str, prompt: tuple[int, ...], hashes: _Hashes) -> tuple[_Entry, int] | None:
        """The entry sharing the longest prefix with `prompt`, and that prefix's length."""
        if hashes.head is None or hashes.head not in self._index:
            return None
        # Each level is a prefix length and its hash, longest first. Every entry sharing at least `shared`
        # tokens is indexed under that level's hash, and one found only further down shares less than
        # `shared` (the levels are at most a block apart): the first level with a match holds the best.
        # Below the head, nothing shares `min_tokens`.
        levels = [
            (depth * self._block_size, hashes.blocks[depth - 1])
            for depth in range(len(hashes.blocks), 0, -1)
            if depth * self._block_size > self._min_tokens
        ]
        levels.append((self._min_tokens, hashes.head))
        best: tuple[_Entry, int] | None = None
        for shared, index_key in levels:
            for entry in self._candidates(index_key):
                if entry.key != key or entry.tokens[:shared] != prompt[:shared]:
                    continue  # a hash collision
                common = _common_prefix(entry.tokens, prompt, shared)
                # Equal prefixes: prefer a state already in RAM, then the smallest one to restore.
                if best is None or (common, entry.state is not None, -len(entry.tokens)) > (
                    best[1],
                    best[0].state is not None,
                    -len(best[0].tokens),
                ):
                    best = (entry, common)
            if best is not None:
                return best
        return None

    def _touch(self, entry: _Entry) -> Path | None:
        """Mark `entry` as just used; its file's path when it has one."""
        if entry.name in self._ram:
            self._ram.move_to_end(entry.name)
        if entry.name not in self._disk or self._directory is None:
            return None
        self._disk.move_to_end(entry.name)
        return self._path(entry.name)

    def _keep_in_ram(self, entry: _Entry, state: bytes) -> None:
        if len(state) > self._max_bytes:
            return
        entry.state = state
        self._ram[entry.name] = None
        self._ram_bytes += len(state)
        while self._ram_bytes > self._max_bytes:
            name, _ = self._ram.popitem(last=False)
            evicted = self._entries[name]
            self._ram_bytes -= len(evicted.state or b"")
            evicted.state = None
            if name not in self._disk:
                self._drop_from_index(evicted)

    def _evict_disk(self) -> None:
        while self._disk_bytes > self._max_disk_bytes:
            name, size = self._disk.popitem(last=False)
            self._disk_bytes -= size
            self._unlink(self._path(name))
            if name not in self._ram:
                self._drop_from_index(self._entries[name])

    def _forget(self, entry: _Entry) -> None:
        if entry.name in self._ram:
            del self._ram[entry.name]
            self._ram_bytes -= len(entry.state or b"")
            entry.state = None
        if entry.name in self._disk:
            self._disk_bytes -= self._disk.pop(entry.name)
            self._unlink(self._path(entry.name))
        self._drop_from_index(entry)

    def _drop_from_index(self, entry: _Entry) -> None:
        del self._entries[entry.name]
        for index_key in entry.hashes.index_keys:
            names = self._index[index_key]
            names.discard(entry.name)
            if not names:
                del self._index[index_key]

    # -- the disk ------------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        assert self._directory is not None
        return self._directory / f"{name}{_SUFFIX}"

    def _open_directory(self, directory: Path, key_file: Path) -> None:
        """Use `directory`, indexing the entries already there by their headers alone."""
        try:
            directory.mkdir(parents=True, exist_ok=True)
            names = sorted(os.listdir(directory))
            self._secret = load_key(key_file)
        except OSError as exc:
            logger.warning("prompt cache: cannot use %s (%s); keeping states in RAM only", directory, exc)
            return
        self._directory = directory
        self._writable = True
        found: list[tuple[float, _Entry, int]] = []
        for filename in names:
            path = directory / filename
            if filename.startswith(".") and filename.endswith(_TEMP_SUFFIX):
                owner = _temp_owner(filename)
                if owner is None or not _alive(owner):
                    self._unlink(path)  # left by a writer that died before renaming it into place
            elif filename.endswith(_SUFFIX):
                scanned = self._scan_file(path)
                if scanned is not None:
                    found.append(scanned)
        for _, entry, size in sorted(found, key=lambda item: item[0]):
            self._entries[entry.name] = entry
            for index_key in entry.hashes.index_keys:
                self._index.setdefault(index_key, set()).add(entry.name)
            self._disk[entry.name] = size
            self._disk_bytes += size
        self._evict_disk()

    def _scan_file(self, path: Path) -> tuple[float, _Entry, int] | None:
        """The entry in the file at `path` with its last use and size; a bad file is removed."""
        try:
            stream = open_regular(path)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # a FIFO or a device: never read, never ours to remove
                logger.warning("prompt cache: ignoring %s: %s", path, exc.strerror)
            else:
                self._discard(path, exc)
            return None
        try:
            with stream:
                header = _read_header(stream, self._secret)
                stat = os.fstat(stream.fileno())
            if stat.st_size != header.offset + header.state_bytes:
                raise _BadFile(f"{stat.st_size} bytes, header says {header.offset + header.state_bytes}")
            name = _entry_name(header.key, header.tokens)
            if path.name != f"{name}{_SUFFIX}":
                raise _BadFile("file name does not match its contents")
        except (OSError, _BadFile) as exc:
            self._discard(path, exc)
            return None
        entry = _Entry(name, header.key, header.tokens, self._hashes(header.key, header.tokens))
        return stat.st_mtime, entry, stat.st_size

    def _discard(self, path: Path, reason: Exception) -> None:
        logger.warning("prompt cache: discarding %s: %s", path, reason)
        self._unlink(path)

    def _write_temp(self, entry: _Entry, state: bytes) -> tuple[Path, int] | None:
        """Write `entry` to a synced temp file; its path and size, or None (no disk, too large, error)."""
        directory = self._directory
        if directory is None or not self._writable:
            return None
        header = _encode_header(self._secret, entry.key, entry.tokens, state)
        size = len(header) + len(state)
        if size > self._max_disk_bytes:
            return None
        temp: Path | None = None
        try:
            # Named by this process's pid: others sharing the folder leave it alone while this process lives.
            prefix = f".{entry.name}.{os.getpid()}."
            fd, temp_name = tempfile.mkstemp(prefix=prefix, suffix=_TEMP_SUFFIX, dir=directory)
            temp = Path(temp_name)
            with os.fdopen(fd, "wb") as stream:
                stream.write(header)
                stream.write(state)
                stream.flush()
                os.fsync(stream.fileno())
        except OSError as exc:
            self._disk_failed(exc)
            if temp is not None:
                self._unlink(temp)
            return None
        return temp, size

    def _commit(self, temp: Path, entry: _Entry) -> bool:
        try:
            os.replace(temp, self._path(entry.name))
        except OSError as exc:
            self._disk_failed(exc)
            self._unlink(temp)
            return False
        return True

    def _disk_failed(self, exc: OSError) -> None:
        # A full disk or a lost directory would fail every later write too: stop writing, say so once.
        if self._writable:
            self._writable = False
            logger.warning(
                "prompt cache: cannot write to %s (%s); no longer saving states to disk", self._directory, exc
            )

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("prompt cache: cannot remove %s (%s)", path, exc)

    @staticmethod
    def _utime(path: Path) -> None:
        # The file's mtime is its last use, which orders disk eviction after a restart.
        try:
            os.utime(path)
        except OSError:
            pass  # evicted meanwhile, or a read-only directory: the order in memory still holds
