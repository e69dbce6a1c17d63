"""Getting blobs into the store: the resumable downloader, and the steps every pull shares.

A blob is downloaded into the store's ``-partial`` file. One larger than a
part is fetched in parallel byte ranges, each written at its own offset; how
far each range has come is kept in ``<partial>.json``, so an interrupted pull
resumes where it stopped. Failures a retry can fix (a connection cut or stalled,
a 429 or 5xx answer) are retried as `retry` says; a host out of reach fails at
once. `commit_blob` then checks
the bytes against their sha256 before they take their real name, and
`commit_pull` writes the manifest once every blob it names is in the store.

Errors name a server's status and host, never what it answered: a pull can be
pointed at any address, and its error must not become a way to read one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import attrs
import httpx

from ...errors import DigestMismatch, InvalidModelFile, LocalLLMError, PullError
from ..names import ModelName
from ..store import GGUF_MEDIA_TYPES, BlobStore, Layer, Manifest, normalize_digest
from .retry import Origin, Retries, TransientError, host_of, pull_timeout_from_env, retry_after_seconds, wait_to_retry

__all__ = [
    "DIGEST_RE",
    "BlobDownload",
    "Progress",
    "PullSettings",
    "check_cancel",
    "check_gguf_layers",
    "commit_blob",
    "commit_pull",
    "describe_error",
    "describe_status",
    "holding",
    "http_client",
    "loopback_with_port",
    "short_digest",
]

log = logging.getLogger("localllm.registry.pull")

Progress = Callable[[dict[str, Any]], None]

MiB = 1 << 20
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_TICK = 0.05  # seconds between progress reports / cancel checks
_SAVE_EVERY = 1.0  # seconds between writes of the progress sidecar
_CANCEL_GRACE = 2.0  # seconds to wait for download threads after a stop before returning anyway
_MAX_REDIRECTS = 10
# Rounds of "fetch what the store lacks, then commit" before a pull whose blobs keep vanishing gives up.
_COMMIT_ROUNDS = 3


@attrs.frozen
class PullSettings:
    """Tuning of the downloader; the defaults suit real registries, tests use tiny values."""

    #: Blobs larger than this are fetched as parallel byte ranges of this size.
    part_size: int = attrs.field(default=64 * MiB, validator=attrs.validators.ge(1))
    #: At most this many connections per blob.
    connections: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    #: A connection that delivers no byte for this many seconds is dropped and retried.
    stall_timeout: float = 30.0
    connect_timeout: float = 30.0
    #: Seconds one request (or byte range) is retried after a failure, all tries together, before the pull gives
    #: up; a try that makes progress starts the count again, and the try under way is not cut short. 0: no retry.
    #: By default ``$LOCALLLM_PULL_TIMEOUT``, else 60 (`retry.DEFAULT_PULL_TIMEOUT`).
    retry_timeout: float = attrs.field(factory=pull_timeout_from_env, validator=attrs.validators.ge(0.0))
    #: At most this many retries of one request after failures that made no progress; None: as time allows.
    max_retries: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(0)))
    #: First backoff delay in seconds; doubled at each retry (with jitter), capped at `max_backoff`.
    backoff: float = 1.0
    max_backoff: float = 30.0


class _Cancelled(Exception):
    pass


def short_digest(digest: str) -> str:
    """The 12 hex digits Ollama shows of a digest."""
    return digest.removeprefix("sha256:")[:12]


_locks_guard = threading.Lock()
_blob_locks: dict[str, threading.Lock] = {}


@contextlib.contextmanager
def holding(store: BlobStore, digests: list[str], cancel: threading.Event | None, what: str) -> Iterator[None]:
    """Hold the download locks of `digests`, so two pulls in one process never write one partial file at once.

    Locks are taken in sorted order (no deadlock between pulls that share blobs) and kept
    until the blobs are committed; a second pull then finds them in the store.
    """
    with _locks_guard:
        locks = [_blob_locks.setdefault(str(store.partial_path(d)), threading.Lock()) for d in sorted(set(digests))]
    held: list[threading.Lock] = []
    try:
        for lock in locks:
            while not lock.acquire(timeout=_TICK):
                check_cancel(cancel, what)
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()


def check_cancel(cancel: threading.Event | None, what: str) -> None:
    if cancel is not None and cancel.is_set():
        raise PullError(f"pull of '{what}' was cancelled")


def loopback_with_port(host: str) -> bool:
    """Whether `host` is ``localhost``, ``127.0.0.1`` or ``[::1]`` with an explicit port (a local registry)."""
    try:
        parts = urlsplit("//" + host)
        port = parts.port
    except ValueError:
        return False
    return port is not None and parts.hostname in ("localhost", "127.0.0.1", "::1")


def http_client(settings: PullSettings, *, insecure: bool) -> httpx.Client:
    """A client for one pull; without `insecure` it speaks plain http to local registries only.

    That holds for every request, redirects included: a registry may send the download to another host (its
    blob storage), but not off https.
    """

    def refuse_plain_http(request: httpx.Request) -> None:
        host = request.url.netloc.decode("ascii", "replace")
        if request.url.scheme == "http" and not insecure and not loopback_with_port(host):
            raise PullError(
                f"refused to fetch from {request.url.host} over plain http (unencrypted); pass insecure=True to"
                " allow it"
            )

    timeout = httpx.Timeout(
        connect=settings.connect_timeout,
        read=settings.stall_timeout,
        write=settings.stall_timeout,
        pool=None,
    )
    limits = httpx.Limits(max_connections=settings.connections + 4, max_keepalive_connections=settings.connections)
    return httpx.Client(
        timeout=timeout,
        limits=limits,
        headers={"User-Agent": "localllm"},
        event_hooks={"request": [refuse_plain_http]},
    )


def describe_status(status: int, url: object) -> str:
    """``HTTP <status> from <host>``: all an error says of a server's answer."""
    host = host_of(url) if urlsplit(str(url)).hostname else "the server"
    return f"HTTP {status} from {host}"


def describe_error(exc: BaseException) -> str:
    """What went wrong; of an error that carries a server's answer, only its status and host."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return describe_status(status, getattr(response, "url", ""))
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."


def commit_blob(store: BlobStore, digest: str, what: str) -> None:
    """Give a finished download its real name once its bytes hash to `digest`; DigestMismatch (and gone) if not."""
    sidecar = _sidecar_path(store.partial_path(digest))
    try:
        store.commit_partial(digest)
    except DigestMismatch as exc:
        raise DigestMismatch(f"pulling '{what}': {exc}", expected=exc.expected, actual=exc.actual) from None
    finally:
        sidecar.unlink(missing_ok=True)


def commit_pull(
    store: BlobStore,
    model: ModelName,
    fetch: Callable[[], tuple[Sequence[Layer], Collection[str]]],
    build: Callable[[Sequence[Layer]], Manifest],
    emit: Progress,
) -> None:
    """Fetch the model's blobs, then check them and write its manifest under the store's lock.

    `fetch` brings into the store whatever of the model it lacks (or holds damaged) and returns every layer the
    model needs with the digests it downloaded; `build` makes the manifest of those layers. Downloads run outside
    the lock; under it the blobs are checked to be there still, GGUF files validated, and the manifest written,
    so no delete or prune can come in between. One that came before (a delete of another model that shared a
    blob) makes the pull fetch what went missing again.
    """
    for _ in range(_COMMIT_ROUNDS):
        layers, downloaded = fetch()
        emit({"status": "writing manifest"})
        with store.lock:
            complete = all(store.blob_path(layer.digest).is_file() for layer in layers)
            if complete:
                check_gguf_layers(store, model, layers, downloaded)
                store.commit_manifest(model, build(layers))
        if complete:
            emit({"status": "success"})
            return
        log.info("a blob of '%s' was removed while it was pulled; fetching it again", model.display)
    raise PullError(
        f"pulling '{model.display}': its blobs were removed from the store while it was pulled, again and again"
        " (a concurrent delete or prune); pull it again"
    )


def check_gguf_layers(store: BlobStore, model: ModelName, layers: Iterable[Layer], fetched: Collection[str]) -> None:
    """Refuse a model whose GGUF files llama.cpp could not load safely, before any manifest names them.

    A refused blob this pull downloaded is removed again, unless a model in the store already uses it.
    """
    from ...gguf import validate_once

    for layer in layers:
        what = GGUF_MEDIA_TYPES.get(layer.media_type)
        if what is None:
            continue
        try:
            validate_once(store.blob_path(layer.digest))
        except InvalidModelFile as exc:
            if layer.digest in fetched:
                store.remove_blobs([layer.digest])
            raise InvalidModelFile(
                f"cannot pull '{model.display}': its {what} is not a GGUF file llama.cpp can load safely, so nothing"
                f" was saved under that name. {exc}"
            ) from None


# --------------------------------------------------------------------------------------------------- blob download


def _sidecar_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


@attrs.define
class _Part:
    offset: int
    size: int
    completed: int = 0

    @property
    def start(self) -> int:
        return self.offset + self.completed

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.offset + self.size

    @property
    def done(self) -> bool:
        return self.completed >= self.size


class BlobDownload:
    """One blob into the store's partial file, in parallel byte ranges, resumable."""

    def __init__(
        self,
        *,
        client: httpx.Client,
        store: BlobStore,
        digest: str,
        size: int,
        url: str,
        headers_for: Callable[[str], dict[str, str]],
        settings: PullSettings,
        cancel: threading.Event | None,
        emit: Progress,
        what: str,
        origin: Origin,
    ) -> None:
        self.client = client
        self.digest = normalize_digest(digest)
        self.size = size
        self.url = url
        self.headers_for = headers_for
        self.settings = settings
        self.cancel = cancel
        self.emit = emit
        self.what = what
        self.origin = origin
        self.partial = store.partial_path(self.digest)
        self.sidecar = _sidecar_path(self.partial)
        self.parts: list[_Part] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.direct_url = url
        self.fd = -1
        self.reported = -1

    # ---- state on disk

    def _load_state(self) -> list[_Part] | None:
        try:
            state = json.loads(self.sidecar.read_text())
            if state.get("digest") != self.digest or state.get("total") != self.size:
                return None
            parts = [_Part(int(p["offset"]), int(p["size"]), int(p["completed"])) for p in state["parts"]]
            on_disk = self.partial.stat().st_size
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        position = 0
        for part in parts:
            if part.offset != position or part.size <= 0 or not 0 <= part.completed <= part.size:
                return None
            position = part.end
        if position != self.size or on_disk != self.size:
            return None
        return parts

    def _save_state(self) -> None:
        with self.lock:
            state = {
                "digest": self.digest,
                "total": self.size,
                "parts": [{"offset": p.offset, "size": p.size, "completed": p.completed} for p in self.parts],
            }
        temp = self.sidecar.with_name(self.sidecar.name + ".tmp")
        try:
            temp.write_text(json.dumps(state))
            os.replace(temp, self.sidecar)
        except OSError as exc:
            log.warning("could not record download progress in %s: %s", self.sidecar, exc)

    def _fresh_parts(self, part_size: int) -> list[_Part]:
        if self.size == 0:
            return []
        return [_Part(offset, min(part_size, self.size - offset)) for offset in range(0, self.size, part_size)]

    def _open(self, fresh: bool) -> None:
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        if fresh:
            os.ftruncate(self.fd, 0)
        os.ftruncate(self.fd, self.size)  # sparse: ranges land at their offsets

    # ---- the run

    @property
    def completed(self) -> int:
        with self.lock:
            return sum(p.completed for p in self.parts)

    def _report(self, *, force: bool = False) -> None:
        completed = self.completed
        if completed == self.reported and not force:
            return
        self.reported = completed
        self.emit(
            {
                "status": f"pulling {short_digest(self.digest)}",
                "digest": self.digest,
                "total": self.size,
                "completed": completed,
            }
        )

    def run(self) -> None:
        """Fill the partial file completely (the caller verifies and commits it)."""
        loaded = self._load_state()
        parts = loaded if loaded is not None else self._fresh_parts(self.settings.part_size)
        remaining = [p for p in parts if not p.done]
        if len(remaining) > 1 or (remaining and remaining[0].start > 0):
            # Ranges needed: find where the bytes really are (a CDN, usually) and whether ranges work there.
            if not self._resolve():
                log.info("%s: the server ignores byte ranges; downloading in one piece", self.url)
                loaded = None
                parts = [_Part(0, self.size)]
        self.parts = parts
        self._open(fresh=loaded is None)
        try:
            self._save_state()
            self._report()
            self._run_parts()
        finally:
            os.close(self.fd)
            self.fd = -1
        self._report(force=True)

    def _run_parts(self) -> None:
        todo = [p for p in self.parts if not p.done]
        if not todo:
            return
        workers = min(self.settings.connections, len(todo))
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="localllm-pull")
        futures = [pool.submit(self._fetch_part, part) for part in todo]
        cancelled = False
        last_save = time.monotonic()
        pending = set(futures)
        try:
            while pending:
                _, pending = concurrent.futures.wait(pending, timeout=_TICK)
                if self.cancel is not None and self.cancel.is_set():
                    cancelled = True
                    self._halt()
                if self.stop.is_set():  # cancelled, or a range failed for good
                    concurrent.futures.wait(pending, timeout=_CANCEL_GRACE)
                    break
                self._report()
                if time.monotonic() - last_save >= _SAVE_EVERY:
                    self._save_state()
                    last_save = time.monotonic()
        except BaseException:
            self._halt()
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            self._save_state()
        if cancelled:
            raise PullError(f"pull of '{self.what}' was cancelled")
        errors = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
        error = next((e for e in errors if not isinstance(e, _Cancelled)), None)
        if isinstance(error, LocalLLMError):
            raise error
        if error is not None:
            raise PullError(
                f"pulling '{self.what}': blob {short_digest(self.digest)}: {describe_error(error)}"
            ) from error
        if not all(p.done for p in self.parts):
            raise PullError(f"pulling '{self.what}': blob {short_digest(self.digest)} was not downloaded completely")

    def _halt(self) -> None:
        """Stop every range: blocked reads are woken by shutting their sockets down."""
        self.stop.set()
        with self.lock:
            sockets = list(self.sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # ---- one range

    def _fetch_part(self, part: _Part) -> None:
        try:
            self._fetch_part_retrying(part)
        except _Cancelled:
            raise
        except BaseException:
            self._halt()  # the other ranges stop now, not at the next tick
            raise

    def _fetch_part_retrying(self, part: _Part) -> None:
        retries = Retries(self.settings)
        while not part.done:
            if self.stop.is_set():
                raise _Cancelled
            before = part.completed
            after = None
            try:
                self._stream(part)
                continue
            except TransientError as exc:
                reason, after = str(exc), exc.after
            except httpx.TimeoutException:
                reason = f"no data for {self.settings.stall_timeout:g} seconds (stalled)"
            except httpx.TransportError as exc:
                if self.stop.is_set():
                    raise _Cancelled from None
                self.origin.check(exc, self.what, self.direct_url)
                reason = describe_error(exc)
            if self.stop.is_set():
                raise _Cancelled
            if part.completed > before:
                retries.progressed()
            delay = retries.delay(after)
            if delay is None:
                raise PullError(
                    f"pulling '{self.what}': downloading blob {short_digest(self.digest)} failed: {reason};"
                    f" {retries.gave_up()}"
                )
            log.info("blob %s bytes %d-%d: %s; retrying", short_digest(self.digest), part.start, part.end - 1, reason)
            if self.stop.wait(delay):
                raise _Cancelled

    def _range_headers(self, url: str, part: _Part) -> dict[str, str]:
        headers = {"Accept-Encoding": "identity", **self.headers_for(url)}
        if part.start > 0 or part.end < self.size:
            headers["Range"] = f"bytes={part.start}-{part.end - 1}"
        return headers

    def _stream(self, part: _Part) -> None:
        url = self.direct_url
        with self._open_stream(url, part) as response:
            status = response.status_code
            if status == 200 and part.start > 0:
                if part.offset == 0 and part.size == self.size:
                    with self.lock:
                        part.completed = 0  # the server sent the whole blob again: take it from the top
                else:
                    raise PullError(
                        f"pulling '{self.what}': the server ignored a byte-range request"
                        f" for blob {short_digest(self.digest)}"
                    )
            elif status == 206:
                _check_content_range(response, part)
            elif status != 200:
                self._status_error(response)
            self._receive(response, part)

    @contextlib.contextmanager
    def _open_stream(self, url: str, part: _Part) -> Iterator[httpx.Response]:
        request = self.client.build_request("GET", url, headers=self._range_headers(url, part))
        response = self.client.send(request, stream=True, follow_redirects=True)
        sock = _socket_of(response)
        try:
            if sock is not None:
                with self.lock:
                    self.sockets.add(sock)
                if self.stop.is_set():
                    raise _Cancelled
            yield response
        finally:
            if sock is not None:
                with self.lock:
                    self.sockets.discard(sock)
            response.close()

    def _receive(self, response: httpx.Response, part: _Part) -> None:
        for chunk in response.iter_bytes():  # as it arrives: what came before a failure is kept
            if self.stop.is_set():
                raise _Cancelled
            if not chunk:
                continue
            room = part.size - part.completed
            if len(chunk) > room:
                chunk = chunk[:room]
            os.pwrite(self.fd, chunk, part.start)
            with self.lock:
                part.completed += len(chunk)
            if part.done:
                return
        if not part.done:
            raise TransientError(f"the connection closed after {part.completed} of {part.size} bytes")

    def _status_error(self, response: httpx.Response) -> None:
        status = response.status_code
        answer = describe_status(status, response.url)
        if status >= 500 or status == 429:  # the server's trouble, or too many requests: the rest of 4xx stays so
            raise TransientError(answer, retry_after_seconds(response.headers))
        if self.direct_url != self.url and status in (401, 403, 404, 410):
            # A signed CDN address may have expired: ask the registry for a new one.
            self.direct_url = self.url
            raise TransientError(f"{answer}, the blob's download address")
        if status == 404:
            raise PullError(f"pulling '{self.what}': there is no blob {self.digest} ({answer})")
        if status in (401, 403):
            raise PullError(f"pulling '{self.what}': access to blob {short_digest(self.digest)} was refused ({answer})")
        raise PullError(f"pulling '{self.what}': blob {short_digest(self.digest)}: unexpected {answer}")

    # ---- redirect resolution

    def _resolve(self) -> bool:
        """Follow the registry's redirects once and remember the final address; True if it serves ranges.

        The blob address usually redirects to a CDN. Resolving it once spares every
        range a round trip to the registry, and credentials are not forwarded there.
        """
        retries = Retries(self.settings)
        while True:
            check_cancel(self.cancel, self.what)
            after = None
            try:
                return self._resolve_once()
            except TransientError as exc:
                reason, after = str(exc), exc.after
            except httpx.TimeoutException:
                reason = f"no answer for {self.settings.stall_timeout:g} seconds"
            except httpx.TransportError as exc:
                self.origin.check(exc, self.what, self.url)
                reason = describe_error(exc)
            delay = retries.delay(after)
            if delay is None:
                raise PullError(
                    f"pulling '{self.what}': blob {short_digest(self.digest)}: {reason}; {retries.gave_up()}"
                )
            log.info("blob %s: %s; retrying", short_digest(self.digest), reason)
            wait_to_retry(delay, self.cancel, self.what)

    def _resolve_once(self) -> bool:
        url = self.url
        for _ in range(_MAX_REDIRECTS):
            headers = {"Accept-Encoding": "identity", "Range": "bytes=0-0", **self.headers_for(url)}
            request = self.client.build_request("GET", url, headers=headers)
            response = self.client.send(request, stream=True, follow_redirects=False)
            try:
                if response.is_redirect and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code in (200, 206):
                    self.direct_url = url
                    return response.status_code == 206
                self.direct_url = self.url
                self._status_error(response)
            finally:
                response.close()
        raise PullError(
            f"pulling '{self.what}': more than {_MAX_REDIRECTS} redirects for blob {short_digest(self.digest)}"
        )


def _socket_of(response: httpx.Response) -> socket.socket | None:
    stream = response.extensions.get("network_stream")
    if stream is None:
        return None
    try:
        sock = stream.get_extra_info("socket")
    except Exception:  # a transport without the notion
        return None
    return sock if isinstance(sock, socket.socket) else None


def _check_content_range(response: httpx.Response, part: _Part) -> None:
    value = response.headers.get("content-range", "")
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", value.strip())
    if match is None or int(match.group(1)) != part.start:
        raise TransientError(f"the server sent the wrong byte range ({value or 'no Content-Range'})")
