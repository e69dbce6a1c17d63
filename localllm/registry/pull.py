"""Pulling models: from OCI registries (Ollama's among them) and from Hugging Face.

`pull(store, name)` looks at the host part of `name`:

* ``hf.co/<owner>/<repo>[:<quant>]`` (or ``huggingface.co/...``) lists the
  repository's GGUF files through huggingface-hub, picks the one whose
  quantization matches the tag (``Q4_K_M`` when there is no tag), downloads it
  and writes a manifest with the model layer and a config blob.
* any other host is spoken to as a docker registry (v2 API), as Ollama does:
  the manifest from ``/v2/<namespace>/<model>/manifests/<tag>``, then every
  blob it lists from ``/v2/<namespace>/<model>/blobs/<digest>``.

Blobs are downloaded into the store's ``-partial`` file. A blob larger than one
part is fetched in parallel byte ranges, each written at its own offset; how far
each range has come is kept in ``<partial>.json`` so an interrupted pull resumes
where it stopped. Every blob is checked against its sha256 before it takes its
real name. Connection errors, server errors and stalled connections are retried
with exponential backoff.

The call is synchronous and meant to run in a worker thread; progress callbacks
are made from that same thread. Setting the `cancel` event stops the pull
promptly and leaves only resumable partial files behind.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import attrs
import httpx

from ..errors import DigestMismatch, InvalidModelFile, LocalLLMError, ModelNotFound, PullError
from .names import ModelName
from .store import (
    GGUF_MEDIA_TYPES,
    MEDIA_CONFIG,
    MEDIA_MANIFEST,
    MEDIA_MODEL,
    BlobStore,
    Layer,
    Manifest,
    go_json,
    normalize_digest,
)

__all__ = ["HF_HOSTS", "PullSettings", "gguf_quant", "pull", "select_gguf"]

log = logging.getLogger("localllm.registry.pull")

Progress = Callable[[dict[str, Any]], None]

MiB = 1 << 20
HF_HOSTS = frozenset({"hf.co", "huggingface.co", "www.huggingface.co"})
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
#: What a Hugging Face repository pulled without a tag gives: Q4_K_M (as with Ollama), else the first of these it has.
HF_QUANT_PREFERENCE = (
    "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "IQ4_XS", "IQ4_NL", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1",
    "Q6_K", "Q8_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "BF16", "F16", "F32",
)  # fmt: skip

_ACCEPT_MANIFEST = ", ".join((MEDIA_MANIFEST, "application/vnd.oci.image.manifest.v1+json"))
_LIST_MEDIA_TYPES = (
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
)
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_QUANT_RE = re.compile(
    r"(?<![A-Za-z0-9])((?:I?Q|TQ)\d+(?:_[A-Za-z0-9]+)*|BF16|FP16|FP32|F16|F32|MXFP4)(?=$|[-.])",
    re.IGNORECASE,
)
_TICK = 0.05  # seconds between progress reports / cancel checks
_SAVE_EVERY = 1.0  # seconds between writes of the progress sidecar
_CANCEL_GRACE = 2.0  # seconds to wait for download threads after a stop before returning anyway
_MAX_REDIRECTS = 10


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
    #: Retries of one request (or byte range) after a failure that made no progress.
    max_retries: int = attrs.field(default=6, validator=attrs.validators.ge(0))
    #: First backoff delay in seconds; doubled at each retry (with jitter), capped at `max_backoff`.
    backoff: float = 1.0
    max_backoff: float = 30.0


class _Cancelled(Exception):
    pass


class _Retry(Exception):
    """A transient failure: try again after a backoff."""


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def _loopback_with_port(host: str) -> bool:
    """Whether `host` is ``localhost``, ``127.0.0.1`` or ``[::1]`` with an explicit port (a local registry)."""
    try:
        parts = urlsplit("//" + host)
        port = parts.port
    except ValueError:
        return False
    return port is not None and parts.hostname in ("localhost", "127.0.0.1", "::1")


_locks_guard = threading.Lock()
_blob_locks: dict[str, threading.Lock] = {}


@contextlib.contextmanager
def _holding(store: BlobStore, digests: list[str], cancel: threading.Event | None, what: str) -> Iterator[None]:
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
                _check_cancel(cancel, what)
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()


def _emitter(progress: Progress | None) -> Progress:
    def emit(event: dict[str, Any]) -> None:
        if progress is not None:
            progress(event)

    return emit


def _check_cancel(cancel: threading.Event | None, what: str) -> None:
    if cancel is not None and cancel.is_set():
        raise PullError(f"pull of '{what}' was cancelled")


# --------------------------------------------------------------------------------------------------- entry point


def pull(
    store: BlobStore,
    name: str | ModelName,
    *,
    progress: Progress | None = None,
    insecure: bool = False,
    cancel: threading.Event | None = None,
    settings: PullSettings | None = None,
) -> None:
    """Download the model `name` into `store`, reporting progress like Ollama's pull stream.

    Events: ``{"status": "pulling manifest"}``, then for each blob
    ``{"status": "pulling <12 hex>", "digest": ..., "total": N, "completed": M}``,
    ``{"status": "verifying sha256 digest"}``, ``{"status": "writing manifest"}`` and
    ``{"status": "success"}``.

    Raises ModelNotFound when the registry has no such model, DigestMismatch when
    a blob's bytes do not hash to its digest, InvalidModelFile when a model file,
    adapter or projector is not a GGUF llama.cpp can load safely (then no manifest
    is written), and PullError for every other failure (including cancellation
    through `cancel`).
    """
    model = ModelName.parse(name)
    settings = settings or PullSettings()
    emit = _emitter(progress)
    _check_cancel(cancel, model.display)
    if model.host.lower() in HF_HOSTS:
        _pull_hf(store, model, emit=emit, cancel=cancel, settings=settings)
    else:
        _pull_oci(store, model, emit=emit, insecure=insecure, cancel=cancel, settings=settings)


def _client(settings: PullSettings) -> httpx.Client:
    timeout = httpx.Timeout(
        connect=settings.connect_timeout,
        read=settings.stall_timeout,
        write=settings.stall_timeout,
        pool=None,
    )
    limits = httpx.Limits(max_connections=settings.connections + 4, max_keepalive_connections=settings.connections)
    return httpx.Client(timeout=timeout, limits=limits, headers={"User-Agent": "localllm"})


def _backoff_delay(settings: PullSettings, attempt: int) -> float:
    delay = min(settings.backoff * (2 ** max(attempt - 1, 0)), settings.max_backoff)
    return delay * (0.5 + random.random())


# --------------------------------------------------------------------------------------------------- OCI registry


@attrs.define
class _Registry:
    """Where a model's manifest and blobs live, and how to authenticate there."""

    client: httpx.Client
    base: str  # scheme://host
    repository: str  # namespace/model
    settings: PullSettings
    cancel: threading.Event | None
    headers: dict[str, str] = attrs.Factory(dict)  # sent to the registry's own host only
    token_tried: bool = False

    def url(self, kind: str, ref: str) -> str:
        return f"{self.base}/v2/{self.repository}/{kind}/{ref}"

    def headers_for(self, url: str) -> dict[str, str]:
        """Credentials go to the registry's host only, never to a CDN it redirects to."""
        return dict(self.headers) if urlsplit(url).netloc == urlsplit(self.base).netloc else {}

    def authenticate(self, response: httpx.Response) -> bool:
        """Answer a Bearer challenge with an anonymous pull token; False when there is none to answer."""
        if self.token_tried:
            return False
        self.token_tried = True
        challenge = response.headers.get("www-authenticate", "")
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() != "bearer":
            return False
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        realm = fields.pop("realm", None)
        if not realm:
            return False
        query = {k: v for k, v in fields.items() if k in ("service", "scope")}
        query.setdefault("scope", f"repository:{self.repository}:pull")
        try:
            answer = self.client.get(realm, params=query)
            answer.raise_for_status()
            token = answer.json().get("token") or answer.json().get("access_token")
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            log.info("could not get a registry token from %s: %s", realm, exc)
            return False
        if not token:
            return False
        self.headers["Authorization"] = f"Bearer {token}"
        return True


def _registry_base(model: ModelName, insecure: bool) -> str:
    host = model.host
    local = _loopback_with_port(host)
    if model.scheme == "http" and not insecure and not local:
        raise PullError(
            f"cannot pull '{model.display}' over plain http: the name asks for http://; pass insecure=True to allow it"
        )
    plain = insecure or model.scheme == "http" or local
    return f"{'http' if plain else 'https'}://{host}"


def _pull_oci(
    store: BlobStore,
    model: ModelName,
    *,
    emit: Progress,
    insecure: bool,
    cancel: threading.Event | None,
    settings: PullSettings,
) -> None:
    emit({"status": "pulling manifest"})
    with _client(settings) as client:
        registry = _Registry(
            client=client,
            base=_registry_base(model, insecure),
            repository=f"{model.namespace}/{model.model}",
            settings=settings,
            cancel=cancel,
        )
        raw = _fetch_manifest(registry, model)
        manifest = _parse_manifest(raw, model)
        blobs: dict[str, int] = {}
        for layer in (*manifest.layers, manifest.config):
            blobs.setdefault(layer.digest, layer.size)
        missing = [d for d in blobs if not store.has_blob(d)]
        with _holding(store, missing, cancel, model.display):
            fetched = []
            for digest, size in blobs.items():
                _check_cancel(cancel, model.display)
                if store.has_blob(digest):
                    emit({"status": f"pulling {_short(digest)}", "digest": digest, "total": size, "completed": size})
                    continue
                _BlobDownload(
                    client=client,
                    store=store,
                    digest=digest,
                    size=size,
                    url=registry.url("blobs", digest),
                    headers_for=registry.headers_for,
                    settings=settings,
                    cancel=cancel,
                    emit=emit,
                    what=model.display,
                ).run()
                fetched.append(digest)
            emit({"status": "verifying sha256 digest"})
            mismatch: DigestMismatch | None = None
            for digest in fetched:
                try:
                    _commit(store, digest, model.display)
                except DigestMismatch as exc:  # the good blobs are still kept
                    mismatch = mismatch or exc
            if mismatch is not None:
                raise mismatch
    _check_gguf_layers(store, model, manifest.layers, fetched)
    emit({"status": "writing manifest"})
    store.write_manifest(model, manifest)
    emit({"status": "success"})


def _check_gguf_layers(store: BlobStore, model: ModelName, layers: Iterable[Layer], fetched: Collection[str]) -> None:
    """Refuse a model whose GGUF files llama.cpp could not load safely, before any manifest names them.

    A refused blob this pull downloaded is removed again, unless a model in the store already uses it.
    """
    from ..gguf import validate_once

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


def _fetch_manifest(registry: _Registry, model: ModelName) -> bytes:
    url = registry.url("manifests", model.tag)
    attempt = 0
    while True:
        _check_cancel(registry.cancel, model.display)
        headers = {"Accept": _ACCEPT_MANIFEST, **registry.headers_for(url)}
        try:
            response = registry.client.get(url, headers=headers, follow_redirects=True)
        except httpx.TransportError as exc:
            reason = f"cannot reach {registry.base}: {_describe(exc)}"
        else:
            status = response.status_code
            if status == 200:
                return response.content
            if status == 404:
                raise ModelNotFound(
                    f"model '{model.display}' not found in the registry {model.host}: check the name and the tag"
                    f" ('{model.tag}')"
                )
            if status == 401 and registry.authenticate(response):
                continue
            if status in (401, 403):
                raise PullError(
                    f"the registry {model.host} refused access to '{model.display}' (HTTP {status}):"
                    " the model may be private, or the registry needs credentials"
                )
            if status < 500 and status != 429:
                raise PullError(
                    f"pulling the manifest of '{model.display}' failed: HTTP {status} {_body_hint(response)}"
                )
            reason = f"the registry {model.host} answered HTTP {status}"
        attempt += 1
        if attempt > registry.settings.max_retries:
            raise PullError(f"pulling the manifest of '{model.display}' failed: {reason}")
        log.info("manifest request failed (%s); retrying", reason)
        _sleep(registry.settings, attempt, registry.cancel, model.display)


def _parse_manifest(raw: bytes, model: ModelName) -> Manifest:
    try:
        obj = json.loads(raw)
    except ValueError:
        raise PullError(f"the registry sent a manifest for '{model.display}' that is not JSON") from None
    if isinstance(obj, dict) and obj.get("mediaType") in _LIST_MEDIA_TYPES:
        raise PullError(f"'{model.display}' is a multi-platform image index, not a model")
    try:
        manifest = Manifest.from_json(raw)
    except LocalLLMError as exc:
        raise PullError(f"the registry sent a malformed manifest for '{model.display}': {exc}") from None
    for layer in (*manifest.layers, manifest.config):
        if not _DIGEST_RE.fullmatch(layer.digest):
            raise PullError(f"the manifest of '{model.display}' names a bad digest {layer.digest!r}")
    if not manifest.layers:
        raise PullError(f"the manifest of '{model.display}' lists no layers")
    return manifest


def _body_hint(response: httpx.Response) -> str:
    try:
        text = response.text.strip()
    except (UnicodeDecodeError, httpx.HTTPError):
        return ""
    return f"({text[:200]})" if text else ""


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."


def _sleep(settings: PullSettings, attempt: int, cancel: threading.Event | None, what: str) -> None:
    delay = _backoff_delay(settings, attempt)
    if cancel is not None:
        cancel.wait(delay)
        _check_cancel(cancel, what)
    else:
        time.sleep(delay)


def _commit(store: BlobStore, digest: str, what: str) -> None:
    sidecar = _sidecar_path(store.partial_path(digest))
    try:
        store.commit_partial(digest)
    except DigestMismatch as exc:
        raise DigestMismatch(f"pulling '{what}': {exc}") from None
    finally:
        sidecar.unlink(missing_ok=True)


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


class _BlobDownload:
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
                "status": f"pulling {_short(self.digest)}",
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
            raise PullError(f"pulling '{self.what}': blob {_short(self.digest)}: {_describe(error)}") from error
        if not all(p.done for p in self.parts):
            raise PullError(f"pulling '{self.what}': blob {_short(self.digest)} was not downloaded completely")

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
        failures = 0
        while not part.done:
            if self.stop.is_set():
                raise _Cancelled
            before = part.completed
            try:
                self._stream(part)
                continue
            except _Retry as exc:
                reason = str(exc)
            except httpx.TimeoutException:
                reason = f"no data for {self.settings.stall_timeout:g} seconds (stalled)"
            except httpx.TransportError as exc:
                reason = _describe(exc)
            if self.stop.is_set():
                raise _Cancelled
            failures = 1 if part.completed > before else failures + 1
            if failures > self.settings.max_retries:
                raise PullError(
                    f"pulling '{self.what}': downloading blob {_short(self.digest)} failed after"
                    f" {failures} attempt{'s' if failures != 1 else ''}: {reason}"
                )
            log.info("blob %s bytes %d-%d: %s; retrying", _short(self.digest), part.start, part.end - 1, reason)
            if self.stop.wait(_backoff_delay(self.settings, failures)):
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
                        f"pulling '{self.what}': the server ignored a byte-range request for blob {_short(self.digest)}"
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
            raise _Retry(f"the connection closed after {part.completed} of {part.size} bytes")

    def _status_error(self, response: httpx.Response) -> None:
        status = response.status_code
        if status >= 500 or status in (408, 429):
            raise _Retry(f"HTTP {status}")
        if self.direct_url != self.url and status in (401, 403, 404, 410):
            # A signed CDN address may have expired: ask the registry for a new one.
            self.direct_url = self.url
            raise _Retry(f"HTTP {status} from the blob's download address")
        if status == 404:
            raise PullError(f"pulling '{self.what}': the registry has no blob {self.digest} (HTTP 404)")
        if status in (401, 403):
            raise PullError(f"pulling '{self.what}': access to blob {_short(self.digest)} was refused (HTTP {status})")
        raise PullError(f"pulling '{self.what}': blob {_short(self.digest)}: unexpected HTTP {status}")

    # ---- redirect resolution

    def _resolve(self) -> bool:
        """Follow the registry's redirects once and remember the final address; True if it serves ranges.

        The blob address usually redirects to a CDN. Resolving it once spares every
        range a round trip to the registry, and credentials are not forwarded there.
        """
        failures = 0
        while True:
            if self.cancel is not None and self.cancel.is_set():
                raise PullError(f"pull of '{self.what}' was cancelled")
            try:
                return self._resolve_once()
            except _Retry as exc:
                reason = str(exc)
            except httpx.TimeoutException:
                reason = f"no answer for {self.settings.stall_timeout:g} seconds"
            except httpx.TransportError as exc:
                reason = _describe(exc)
            failures += 1
            if failures > self.settings.max_retries:
                raise PullError(f"pulling '{self.what}': blob {_short(self.digest)}: {reason}")
            _sleep(self.settings, failures, self.cancel, self.what)

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
        raise PullError(f"pulling '{self.what}': more than {_MAX_REDIRECTS} redirects for blob {_short(self.digest)}")


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
        raise _Retry(f"the server sent the wrong byte range ({value or 'no Content-Range'})")


# --------------------------------------------------------------------------------------------------- Hugging Face


def gguf_quant(filename: str) -> str | None:
    """The quantization a GGUF file name carries (``model-Q4_K_M.gguf`` -> ``Q4_K_M``), upper-cased."""
    stem = filename.rsplit("/", 1)[-1]
    stem = _SPLIT_RE.sub("", stem)
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    found = _QUANT_RE.findall(stem)
    return found[-1].upper() if found else None


def _is_projector(filename: str) -> bool:
    return "mmproj" in filename.rsplit("/", 1)[-1].lower()


def select_gguf(files: list[str], tag: str | None, repo: str) -> str:
    """The file of `files` to pull for `tag` (None or 'latest': the preferred default quantization).

    Raises PullError when nothing matches (naming the quantizations there are) or
    when the match is split into shards.
    """
    ggufs = [f for f in files if f.lower().endswith(".gguf") and not _is_projector(f)]
    if not ggufs:
        raise PullError(f"the Hugging Face repository '{repo}' has no GGUF files")
    quants: dict[str, list[str]] = {}
    for file in ggufs:
        quants.setdefault(gguf_quant(file) or file, []).append(file)
    available = ", ".join(quants)
    wanted = None if tag is None or tag.lower() == "latest" else tag
    if wanted is None:
        choice = next((quants[q] for q in HF_QUANT_PREFERENCE if q in quants), None)
        if choice is None:
            if len(quants) != 1:
                raise PullError(
                    f"the Hugging Face repository '{repo}' has no Q4_K_M file; pick one of its quantizations with a"
                    f" tag (hf.co/{repo}:<quant>): {available}"
                )
            choice = next(iter(quants.values()))
        label = "the default quantization"
    else:
        folded = wanted.lower()
        choice = next((files_ for q, files_ in quants.items() if q.lower() == folded), None)
        if choice is None:
            choice = [f for f in ggufs if f.lower().removesuffix(".gguf").endswith(("-" + folded, "." + folded))]
        if not choice:
            raise PullError(
                f"the Hugging Face repository '{repo}' has no GGUF file for '{wanted}'; available quantizations:"
                f" {available}"
            )
        label = f"'{wanted}'"
    whole = [f for f in choice if not _SPLIT_RE.search(f)]
    if not whole:
        raise PullError(
            f"the GGUF for {label} in '{repo}' is split into shards ({choice[0]}, ...); split GGUF files are not"
            " supported: merge them with llama-gguf-split --merge and create the model from the result"
        )
    return sorted(whole, key=lambda f: (f.count("/"), len(f), f))[0]


def _hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")


def _hf_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is not None:
        return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


def _pull_hf(
    store: BlobStore,
    model: ModelName,
    *,
    emit: Progress,
    cancel: threading.Event | None,
    settings: PullSettings,
) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = f"{model.namespace}/{model.model}"
    if _hf_offline():
        raise PullError(f"cannot pull '{model.display}': Hugging Face offline mode is on (HF_HUB_OFFLINE)")
    endpoint = _hf_endpoint()
    emit({"status": "pulling manifest"})
    api = HfApi(endpoint=endpoint, library_name="localllm")
    try:
        info = api.model_info(repo, files_metadata=True)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ModelNotFound(
            f"model '{model.display}' not found: Hugging Face has no repository '{repo}'"
            " (or it is private: set HF_TOKEN)"
        ) from None
    except GatedRepoError:
        raise PullError(
            f"the Hugging Face repository '{repo}' is gated: accept its terms on the website and set HF_TOKEN"
        ) from None
    except OfflineModeIsEnabled:
        raise PullError(f"cannot pull '{model.display}': Hugging Face offline mode is on (HF_HUB_OFFLINE)") from None
    except HfHubHTTPError as exc:
        raise PullError(f"listing the files of '{repo}' on {endpoint} failed: {_describe(exc)}") from None
    except Exception as exc:  # the hub client's transport errors are of its own HTTP library
        raise PullError(f"cannot reach {endpoint} to list the files of '{repo}': {_describe(exc)}") from None
    siblings = {s.rfilename: s for s in info.siblings or []}
    filename = select_gguf(list(siblings), model.tag, repo)
    sibling = siblings[filename]
    revision = info.sha or "main"
    _check_cancel(cancel, model.display)

    if sibling.lfs is not None and _DIGEST_RE.fullmatch("sha256:" + str(sibling.lfs.sha256).lower()):
        digest = "sha256:" + str(sibling.lfs.sha256).lower()
        size = int(sibling.lfs.size)
        with _holding(store, [digest], cancel, model.display):
            fetched = not store.has_blob(digest)
            if not fetched:
                emit({"status": f"pulling {_short(digest)}", "digest": digest, "total": size, "completed": size})
            else:
                _download_hf_lfs(store, repo, filename, revision, endpoint, digest, size, model, emit, cancel, settings)
                emit({"status": "verifying sha256 digest"})
                _commit(store, digest, model.display)
    else:
        digest = _hf_download_small(store, repo, filename, revision, endpoint, model, emit)
        emit({"status": "verifying sha256 digest"})
        fetched = True

    size = store.blob_path(digest).stat().st_size
    model_layer = Layer(media_type=MEDIA_MODEL, digest=digest, size=size)
    _check_gguf_layers(store, model, [model_layer], [digest] if fetched else [])
    _write_hf_manifest(store, model, model_layer, emit)


def _download_hf_lfs(
    store: BlobStore,
    repo: str,
    filename: str,
    revision: str,
    endpoint: str,
    digest: str,
    size: int,
    model: ModelName,
    emit: Progress,
    cancel: threading.Event | None,
    settings: PullSettings,
) -> None:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
    hub_headers = build_hf_headers(library_name="localllm")
    hub_host = urlsplit(endpoint).netloc

    def headers_for(target: str) -> dict[str, str]:
        """The token goes to the hub only, never to the storage it redirects to."""
        if urlsplit(target).netloc == hub_host:
            return dict(hub_headers)
        return {k: v for k, v in hub_headers.items() if k.lower() != "authorization"}

    with _client(settings) as client:
        _BlobDownload(
            client=client,
            store=store,
            digest=digest,
            size=size,
            url=url,
            headers_for=headers_for,
            settings=settings,
            cancel=cancel,
            emit=emit,
            what=model.display,
        ).run()


def _hf_download_small(
    store: BlobStore, repo: str, filename: str, revision: str, endpoint: str, model: ModelName, emit: Progress
) -> str:
    """A file kept in git rather than LFS (so no sha256 is published): through huggingface-hub's own download."""
    from huggingface_hub import hf_hub_download

    try:
        local = hf_hub_download(
            repo,
            filename,
            revision=revision,
            cache_dir=store.root / ".hf-cache",
            endpoint=endpoint,
            library_name="localllm",
        )
    except Exception as exc:
        raise PullError(f"downloading {filename} from '{repo}' failed: {_describe(exc)}") from None
    path = Path(str(local)).resolve()
    digest = store.add_file(path, link=True)
    size = path.stat().st_size
    emit({"status": f"pulling {_short(digest)}", "digest": digest, "total": size, "completed": size})
    return digest


def _write_hf_manifest(store: BlobStore, model: ModelName, model_layer: Layer, emit: Progress) -> None:
    from ..gguf import read_info

    info = read_info(store.blob_path(model_layer.digest))
    config = _hf_config(info.architecture, info.parameter_size, info.file_type, model_layer.digest)
    config_data = go_json(config)
    config_digest = store.add_bytes(config_data)
    manifest = Manifest(
        config=Layer(media_type=MEDIA_CONFIG, digest=config_digest, size=len(config_data)),
        layers=(model_layer,),
    )
    emit({"status": "writing manifest"})
    store.write_manifest(model, manifest)
    emit({"status": "success"})


def _hf_config(architecture: str, parameter_size: str, file_type: str, digest: str) -> Mapping[str, Any]:
    return {
        "model_format": "gguf",
        "model_family": architecture,
        "model_families": [architecture] if architecture else [],
        "model_type": parameter_size,
        "file_type": file_type,
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [digest]},
    }
