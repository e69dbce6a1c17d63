"""Loopback servers speaking the protocols models are pulled with, for tests.

* `OCIRegistry`: a docker v2 registry (manifests and blobs with byte ranges), with
  knobs to misbehave: cut a connection, serve wrong bytes, stall, fail with 5xx,
  answer with an error and a body, ignore byte ranges, redirect blobs to its CDN
  (or anywhere), demand a bearer token.
* `HFHub`: the Hugging Face hub endpoints huggingface-hub calls to list a model
  repository (``/api/models/<repo>[/revision/<rev>]``) and to download a file
  (``/<repo>/resolve/<rev>/<file>``; LFS files are redirected to its CDN).
* `BlobCDN`: the storage both redirect to, on a port (so a host) of its own; it
  refuses any request that carries credentials.

Each listens on 127.0.0.1 on a free port, in a background thread, logs the
requests it gets and counts the body bytes it serves, so tests can tell how
much a resumed download fetched. Use them as context managers.

`localllm_shim` runs localllm's own HTTP shim the same way, for the HTTP tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from localllm.http import ServerThread

import attrs

MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_MODEL = "application/vnd.ollama.image.model"

_CHUNK = 8192


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tiny_gguf(
    *,
    seed: int = 0,
    rows: int = 32,
    chat_template: str | None = None,
    file_type: int = 15,
    tokens: Sequence[str] | None = None,
) -> bytes:
    """A small llama GGUF: metadata, a vocabulary and two tensors (3 KiB + 64 bytes a row).

    It is valid unless `tokens` (the vocabulary, 32 tokens "t<i>" by default) makes it not.
    """
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tiny.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_name(f"tiny-{seed}")
        writer.add_context_length(64)
        writer.add_embedding_length(16)
        writer.add_block_count(0)
        writer.add_feed_forward_length(32)
        writer.add_head_count(2)
        writer.add_file_type(file_type)
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(list(tokens) if tokens is not None else [f"t{i}" for i in range(32)])
        if chat_template is not None:
            writer.add_chat_template(chat_template)
        writer.add_tensor("token_embd.weight", rng.standard_normal((rows, 16)).astype(np.float32))
        writer.add_tensor("output_norm.weight", rng.standard_normal(16).astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a ``bytes=a-b`` header, or None for the whole body."""
    if not header:
        return None
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if match is None or not (match.group(1) or match.group(2)):
        raise ValueError(header)
    if not match.group(1):  # suffix range
        n = int(match.group(2))
        return max(size - n, 0), size - 1
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) else size - 1
    if start >= size or end < start:
        raise ValueError(header)
    return start, min(end, size - 1)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.server.owner._dispatch(self, "GET")

    def do_HEAD(self) -> None:
        self.server.owner._dispatch(self, "HEAD")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    owner: LoopbackServer


@attrs.define(eq=False)
class Request:
    method: str
    path: str
    headers: dict[str, str]


class LoopbackServer:
    """An HTTP server on 127.0.0.1 in a background thread; subclasses answer requests."""

    def __init__(self) -> None:
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self.served: Counter[str] = Counter()  # body bytes sent, by resource key

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``, as the host part of a model name."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> LoopbackServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def requests_to(self, fragment: str, method: str | None = None) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if fragment in r.path and (method is None or r.method == method)]

    # ---- plumbing for subclasses

    def _dispatch(self, handler: _Handler, method: str) -> None:
        with self.lock:
            self.requests.append(Request(method, handler.path, {k.lower(): v for k, v in handler.headers.items()}))
        try:
            self.handle(handler, method)
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True

    def handle(self, handler: _Handler, method: str) -> None:
        raise NotImplementedError

    def send_status(
        self,
        handler: _Handler,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        head: bool = False,
    ) -> None:
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if body and not head:
            handler.wfile.write(body)

    def send_json(
        self,
        handler: _Handler,
        value: Any,
        status: int = 200,
        headers: dict[str, str] | None = None,
        *,
        head: bool = False,
    ) -> None:
        body = json.dumps(value).encode()
        self.send_status(handler, status, body, {"Content-Type": "application/json", **(headers or {})}, head=head)

    def send_body(
        self,
        handler: _Handler,
        key: str,
        data: bytes,
        *,
        head: bool = False,
        headers: dict[str, str] | None = None,
        ranges: bool = True,
        cut_after: int | None = None,
        stall: tuple[int, float] | None = None,
    ) -> None:
        """Send `data` (or the range asked for), counting bytes under `key`.

        `cut_after`: close the connection after that many body bytes.
        `stall`: (at offset n of `data`, seconds) go silent for that long there (at once if the range starts later).
        """
        size = len(data)
        try:
            wanted = _parse_range(handler.headers.get("Range"), size) if ranges else None
        except ValueError:
            self.send_status(handler, 416, headers={"Content-Range": f"bytes */{size}"}, head=head)
            return
        extra = {"Accept-Ranges": "bytes" if ranges else "none", **(headers or {})}
        if wanted is None:
            start, end, status = 0, size - 1, 200
        else:
            start, end, status = wanted[0], wanted[1], 206
            extra["Content-Range"] = f"bytes {start}-{end}/{size}"
        body = data[start : end + 1]
        if stall is not None:  # the stall point is an offset in the whole resource
            stall = (max(stall[0] - start, 0), stall[1])
        handler.send_response(status)
        for k, v in extra.items():
            handler.send_header(k, v)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if head:
            return
        sent = 0
        stop_at = len(body) if cut_after is None else min(len(body), cut_after)
        while sent < stop_at:
            if stall is not None and sent >= stall[0]:
                self.stopping.wait(stall[1])
                stall = None
            limit = stop_at if stall is None else min(stop_at, stall[0])
            chunk = body[sent : min(sent + _CHUNK, limit)]
            handler.wfile.write(chunk)
            sent += len(chunk)
            with self.lock:
                self.served[key] += len(chunk)
        if sent < len(body):
            handler.close_connection = True


class BlobCDN(LoopbackServer):
    """Storage that registries redirect downloads to: another host, which must never see credentials."""

    def __init__(self) -> None:
        super().__init__()
        self.objects: dict[str, bytes] = {}  # key (a digest or sha256 hex) -> bytes
        self.stall: dict[str, tuple[int, float]] = {}  # key -> (at offset n, seconds), every request

    def handle(self, handler: _Handler, method: str) -> None:
        head = method == "HEAD"
        match = re.fullmatch(r"/cdn/([^/]+)", urlsplit(handler.path).path)
        if match is None or match.group(1) not in self.objects:
            self.send_status(handler, 404, b"no such object", head=head)
            return
        if "authorization" in {k.lower() for k in handler.headers}:
            self.send_status(handler, 400, b"credentials must not reach the CDN", head=head)
            return
        key = match.group(1)
        self.send_body(handler, key, self.objects[key], head=head, stall=self.stall.get(key))


# --------------------------------------------------------------------------------------------------- OCI registry


class OCIRegistry(LoopbackServer):
    """A docker v2 registry serving Ollama-style model manifests and blobs."""

    def __init__(self) -> None:
        super().__init__()
        self.manifests: dict[tuple[str, str], bytes] = {}
        self.blobs: dict[str, bytes] = {}
        # knobs
        self.cut_at: dict[str, int] = {}  # digest -> close the connection once n bytes of it were served (once)
        self.corrupt: set[str] = set()  # digests served with wrong bytes
        self.stall: dict[str, tuple[int, float, int]] = {}  # digest -> (at offset n, seconds, requests; -1 all)
        self.manifest_failures = 0  # answer this many manifest requests with 503 first
        self.errors: dict[str, tuple[int, bytes]] = {}  # "manifests" or "blobs" -> (status, body) for every request
        self.redirect_blobs = False  # 307 blob requests to the CDN (another port: another host)
        self.cdn = BlobCDN()
        self.redirect_base: str | None = None  # where blobs are redirected to, if not the CDN: "<base>/cdn/<digest>"
        self.ranges = True
        self.token: str | None = None  # demand "Authorization: Bearer <token>" (anonymous token at /token)
        self.token_grant = True  # whether /token hands the token out

    def start(self) -> OCIRegistry:
        self.cdn.start()
        super().start()
        return self

    def stop(self) -> None:
        super().stop()
        self.cdn.stop()

    def add_blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        self.blobs[digest] = data
        self.cdn.objects[digest] = data
        return digest

    def add_model(
        self,
        repository: str,
        tag: str,
        model: bytes,
        *,
        config: bytes | None = None,
        extra: Sequence[tuple[str, bytes]] = (),
    ) -> dict[str, Any]:
        """Publish a model (GGUF layer, optional extra layers, config blob); return the manifest."""
        layers = [{"mediaType": MEDIA_MODEL, "digest": self.add_blob(model), "size": len(model)}]
        for media_type, data in extra:
            layers.append({"mediaType": media_type, "digest": self.add_blob(data), "size": len(data)})
        if config is None:
            config = json.dumps(
                {"model_format": "gguf", "model_family": "llama", "rootfs": {"type": "layers", "diff_ids": []}}
            ).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": self.add_blob(config), "size": len(config)},
            "layers": layers,
        }
        self.manifests[(repository, tag)] = json.dumps(manifest, indent=2).encode()
        return manifest

    def handle(self, handler: _Handler, method: str) -> None:
        path = urlsplit(handler.path).path
        head = method == "HEAD"
        if path == "/token":
            if self.token_grant:
                self.send_json(handler, {"token": self.token}, head=head)
            else:
                self.send_json(handler, {"errors": [{"code": "DENIED"}]}, 403, head=head)
            return
        if path == "/v2/" or path == "/v2":
            self.send_json(handler, {}, head=head)
            return
        match = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", path)
        if match is None:
            self.send_status(handler, 404, b"not found", head=head)
            return
        if self.token is not None and handler.headers.get("Authorization") != f"Bearer {self.token}":
            challenge = (
                f'Bearer realm="{self.url}/token",service="test-registry",scope="repository:{match.group(1)}:pull"'
            )
            self.send_json(
                handler, {"errors": [{"code": "UNAUTHORIZED"}]}, 401, {"WWW-Authenticate": challenge}, head=head
            )
            return
        repository, kind, ref = match.groups()
        if kind in self.errors:
            status, body = self.errors[kind]
            self.send_status(handler, status, body, {"Content-Type": "text/plain"}, head=head)
            return
        if kind == "manifests":
            with self.lock:
                fail = self.manifest_failures > 0
                if fail:
                    self.manifest_failures -= 1
            if fail:
                self.send_status(handler, 503, b"try again", head=head)
                return
            manifest = self.manifests.get((repository, ref))
            if manifest is None:
                self.send_json(handler, {"errors": [{"code": "MANIFEST_UNKNOWN"}]}, 404, head=head)
                return
            self.send_status(handler, 200, manifest, {"Content-Type": MEDIA_MANIFEST}, head=head)
            return
        if ref not in self.blobs:
            self.send_json(handler, {"errors": [{"code": "BLOB_UNKNOWN"}]}, 404, head=head)
            return
        if self.redirect_blobs:
            base = self.redirect_base or self.cdn.url
            self.send_status(handler, 307, headers={"Location": f"{base}/cdn/{ref}"}, head=head)
            return
        self._send_blob(handler, ref, head)

    def _body_length(self, handler: _Handler, size: int) -> int:
        try:
            wanted = _parse_range(handler.headers.get("Range"), size) if self.ranges else None
        except ValueError:
            return 0
        return size if wanted is None else wanted[1] - wanted[0] + 1

    def _send_blob(self, handler: _Handler, digest: str, head: bool) -> None:
        data = self.blobs.get(digest)
        if data is None:
            self.send_status(handler, 404, b"no such blob", head=head)
            return
        if digest in self.corrupt:
            data = bytes(b ^ 0x55 for b in data)
        stall = None
        with self.lock:
            cut = None
            if not head and digest in self.cut_at:
                cut = max(self.cut_at[digest] - self.served[digest], 0)
                if cut < self._body_length(handler, len(data)):
                    del self.cut_at[digest]
            if not head and digest in self.stall:
                after, seconds, count = self.stall[digest]
                stall = (after, seconds)
                if count > 0:
                    if count == 1:
                        del self.stall[digest]
                    else:
                        self.stall[digest] = (after, seconds, count - 1)
        self.send_body(handler, digest, data, head=head, ranges=self.ranges, cut_after=cut, stall=stall)


# --------------------------------------------------------------------------------------------------- Hugging Face


@attrs.define
class HFRepo:
    sha: str
    files: dict[str, bytes]
    lfs: set[str]  # file names stored with LFS (listed with a sha256)


class HFHub(LoopbackServer):
    """The parts of the Hugging Face hub that listing and downloading a model repository use."""

    def __init__(self) -> None:
        super().__init__()
        self.repos: dict[str, HFRepo] = {}
        self.cdn = BlobCDN()  # where LFS files are redirected to
        self.errors: dict[str, tuple[int, bytes]] = {}  # "api" or "resolve" -> (status, body) for every request

    def start(self) -> HFHub:
        self.cdn.start()
        super().start()
        return self

    def stop(self) -> None:
        super().stop()
        self.cdn.stop()

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, lfs: bool = True) -> HFRepo:
        sha = hashlib.sha1("\0".join([repo_id, *sorted(files)]).encode()).hexdigest()
        repo = HFRepo(sha=sha, files=dict(files), lfs=set(files) if lfs else set())
        self.repos[repo_id] = repo
        for name in repo.lfs:
            self.cdn.objects[hashlib.sha256(files[name]).hexdigest()] = files[name]
        return repo

    def _find(self, repo_id: str, revision: str | None) -> HFRepo | None:
        repo = self.repos.get(repo_id)
        if repo is None or (revision not in (None, "main", repo.sha)):
            return None
        return repo

    def handle(self, handler: _Handler, method: str) -> None:
        parts = urlsplit(handler.path)
        path = unquote(parts.path)
        head = method == "HEAD"
        kind = "api" if path.startswith("/api/") else "resolve"
        if kind in self.errors:
            status, body = self.errors[kind]
            self.send_status(handler, status, body, {"Content-Type": "text/plain"}, head=head)
            return
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if api:
            self._model_info(handler, api.group(1), api.group(2), parse_qs(parts.query), head)
            return
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if resolve:
            self._resolve(handler, *resolve.groups(), head=head)
            return
        self.send_status(handler, 404, b"not found", head=head)

    def _not_found(self, handler: _Handler, head: bool) -> None:
        self.send_json(
            handler,
            {"error": "Repository not found"},
            404,
            {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
            head=head,
        )

    def _model_info(
        self, handler: _Handler, repo_id: str, revision: str | None, query: dict[str, Any], head: bool
    ) -> None:
        repo = self._find(repo_id, revision)
        if repo is None:
            self._not_found(handler, head)
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for name, data in repo.files.items():
            entry: dict[str, Any] = {"rfilename": name}
            if blobs:
                entry["size"] = len(data)
                entry["blobId"] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                if name in repo.lfs:
                    entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(entry)
        info = {
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.sha,
            "private": False,
            "siblings": siblings,
            "tags": ["gguf"],
        }
        self.send_json(handler, info, head=head)

    def _resolve(self, handler: _Handler, repo_id: str, revision: str, filename: str, *, head: bool) -> None:
        repo = self._find(repo_id, revision)
        if repo is None:
            self._not_found(handler, head)
            return
        data = repo.files.get(filename)
        if data is None:
            self.send_json(
                handler,
                {"error": "Entry not found"},
                404,
                {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha},
                head=head,
            )
            return
        git_etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        if filename in repo.lfs:
            sha = hashlib.sha256(data).hexdigest()
            headers = {
                "X-Repo-Commit": repo.sha,
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(data)),
                "ETag": f'"{git_etag}"',
                "Location": f"{self.cdn.url}/cdn/{sha}",
            }
            self.send_status(handler, 302, b"", headers, head=head)
            return
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{git_etag}"'}
        self.send_body(handler, f"{repo_id}/{filename}", data, head=head, headers=headers)


@contextlib.contextmanager
def localllm_shim(home: Path, smollm2: Path | None = None, **settings: Any) -> Iterator[ServerThread]:
    """localllm's HTTP shim on loopback over a fresh engine (2 slots) in `home`.

    With `smollm2`, the model is first created in that home as "smollm2" (num_ctx 2048, one thread).
    `settings` go to `ServerThread` (size limits).
    """
    import anyio

    import localllm
    from localllm.http import ServerThread

    if smollm2 is not None:
        modelfile = home / "Modelfile"
        modelfile.write_text(f"FROM {smollm2}\nPARAMETER num_ctx 2048\nPARAMETER num_thread 1\n")

        async def create() -> None:
            async with localllm.Engine(home) as engine:
                await engine.create("smollm2", modelfile=modelfile)

        anyio.run(create)
    with ServerThread(lambda: localllm.Engine(home, num_parallel=2), **settings) as running:
        yield running
