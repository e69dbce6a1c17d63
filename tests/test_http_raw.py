"""The HTTP shim at the wire: bad requests, limits, statuses, disconnects, binding."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from servers import localllm_shim
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import localllm
from localllm.http import ServerThread, is_loopback
from localllm.http.common import APIError, Put, status_for
from localllm.http.ollama_api import ndjson

LIMIT = 64 * 1024
BLOB_LIMIT = 1 << 20
LONG = {"temperature": 0.8, "num_predict": 1500, "seed": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[ServerThread]:
    home = tmp_path_factory.mktemp("home")
    with localllm_shim(home, smollm2_path, max_request_size=LIMIT, max_blob_size=BLOB_LIMIT) as running:
        yield running


@pytest.fixture
def http(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def active_sequences(server: ServerThread) -> int:
    loaded = list(server.engine.scheduler.loaded.values())
    return sum(m.runner.active_count for m in loaded) + sum(m.users for m in loaded)


def wait_until_idle(server: ServerThread, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while active_sequences(server):
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.05)


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/api/show", "/api/embed", "/api/pull"])
def test_malformed_json_is_400(http: httpx.Client, path: str) -> None:
    answer = http.post(path, content=b'{"model": "smollm2",')
    assert answer.status_code == 400
    assert "invalid JSON" in answer.json()["error"]


def test_missing_or_non_object_body_is_400(http: httpx.Client) -> None:
    assert http.post("/api/generate", content=b"").json() == {"error": "missing request body"}
    answer = http.post("/api/generate", json=["smollm2"])
    assert answer.status_code == 400 and "JSON object" in answer.json()["error"]
    answer = http.post("/api/generate", json={"prompt": "hi"})
    assert answer.status_code == 400 and answer.json()["error"] == "model is required"


def test_unknown_model_is_404(http: httpx.Client) -> None:
    for path, body in (
        ("/api/generate", {"model": "nope", "prompt": "hi"}),
        ("/api/generate", {"model": "nope", "prompt": "hi", "stream": False}),
        ("/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
        ("/api/show", {"model": "nope"}),
        ("/api/embed", {"model": "nope", "input": "hi"}),
    ):
        answer = http.post(path, json=body)
        assert answer.status_code == 404, (path, answer.text)
        assert answer.headers["content-type"].startswith("application/json")
        assert "not found" in answer.json()["error"]
    assert http.request("DELETE", "/api/delete", json={"model": "nope"}).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"options": {"temperature": "hot"}},
        {"options": {"num_predict": 1.5}},
        {"options": {"stop": 3}},
        {"options": ["temperature"]},
        {"stream": "yes"},
        {"prompt": 42},
        {"context": ["a"]},
        {"keep_alive": "forever and ever"},
        {"format": 3},
        {"think": "very"},
    ],
)
def test_wrong_types_are_400(http: httpx.Client, body: dict[str, object]) -> None:
    answer = http.post("/api/generate", json={"model": "smollm2", "prompt": "hi", **body})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]


def test_bad_chat_messages_are_400(http: httpx.Client) -> None:
    for messages in ("hi", ["hi"], [{"content": "no role"}], [{"role": "robot", "content": "hi"}]):
        answer = http.post("/api/chat", json={"model": "smollm2", "messages": messages})
        assert answer.status_code == 400, (messages, answer.text)


def test_oversize_json_body_is_413(http: httpx.Client) -> None:
    answer = http.post("/api/generate", json={"model": "smollm2", "prompt": "x" * (LIMIT + 10)})
    assert answer.status_code == 413
    assert "limit" in answer.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        yield b'{"model": "smollm2", "prompt": "'
        for _ in range(LIMIT // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    answer = http.post("/api/generate", content=chunks())
    assert answer.status_code == 413
    answer = http.post("/v1/chat/completions", json={"model": "smollm2", "messages": [{"content": "x" * LIMIT}]})
    assert answer.status_code == 413 and answer.json()["error"]["type"] == "invalid_request_error"


def test_blob_upload_checks_digest_and_size(http: httpx.Client) -> None:
    data = b"GGUF" + bytes(range(256)) * 64
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    wrong = "sha256:" + hashlib.sha256(b"other").hexdigest()
    answer = http.post(f"/api/blobs/{wrong}", content=data)
    assert answer.status_code == 400 and "digest mismatch" in answer.json()["error"]
    assert http.head(f"/api/blobs/{wrong}").status_code == 404

    assert http.post(f"/api/blobs/{digest}", content=data).status_code == 201
    assert http.head(f"/api/blobs/{digest}").status_code == 200
    assert http.post(f"/api/blobs/{digest}", content=data).status_code == 200  # already there

    big = b"\0" * (BLOB_LIMIT + 1)
    big_digest = "sha256:" + hashlib.sha256(big).hexdigest()
    assert http.post(f"/api/blobs/{big_digest}", content=big).status_code == 413
    assert http.head(f"/api/blobs/{big_digest}").status_code == 404
    assert http.post("/api/blobs/md5:abc", content=data).status_code == 400


def test_create_from_an_uploaded_non_gguf_blob_is_400(http: httpx.Client) -> None:
    data = b"this is not a model"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert http.post(f"/api/blobs/{digest}", content=data).status_code == 201
    answer = http.post("/api/create", json={"model": "junk", "files": {"junk.gguf": digest}, "stream": False})
    assert answer.status_code == 400, answer.text


# --------------------------------------------------------------------------- streams and disconnects


def test_ndjson_stream_lines(http: httpx.Client) -> None:
    body = {"model": "smollm2", "prompt": "Hi", "options": {"num_predict": 5, "temperature": 0}}
    with http.stream("POST", "/api/generate", json=body) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 5
    assert all(line["done"] is False for line in lines[:-1])


def test_disconnect_mid_stream_frees_the_slot(server: ServerThread, http: httpx.Client) -> None:
    body = {"model": "smollm2", "prompt": "Tell me a very long story.", "options": LONG}
    with http.stream("POST", "/api/generate", json=body) as response:
        lines = response.iter_lines()
        first = json.loads(next(lines))
        assert first["done"] is False
        assert active_sequences(server) >= 1
    # The connection is closed: the server stops generating and the runner holds no sequence.
    wait_until_idle(server)


def test_disconnect_mid_openai_stream_frees_the_slot(server: ServerThread, http: httpx.Client) -> None:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "stream": True,
        "max_tokens": 1500,
        "seed": 1,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                break
        assert active_sequences(server) >= 1
    wait_until_idle(server)


def test_disconnect_while_waiting_for_a_whole_answer(server: ServerThread) -> None:
    body = {"model": "smollm2", "prompt": "Tell me a very long story.", "options": LONG, "stream": False}
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=server.url, timeout=2.0) as impatient:
        impatient.post("/api/generate", json=body)
    wait_until_idle(server)


def test_the_server_still_answers_after_disconnects(http: httpx.Client) -> None:
    body = {"model": "smollm2", "prompt": "Hi", "stream": False, "options": {"num_predict": 3, "temperature": 0}}
    answer = http.post("/api/generate", json=body)
    assert answer.status_code == 200 and answer.json()["eval_count"] == 3


def test_error_after_the_stream_started_is_an_error_line() -> None:
    async def produce(put: Put) -> None:
        await put({"status": "working"})
        raise localllm.RunnerError("the runner failed")

    async def fails_at_once(put: Put) -> None:
        raise localllm.QueueFull("too many requests")

    async def midway(request: Request) -> Response:
        return ndjson(produce)

    async def early(request: Request) -> Response:
        return ndjson(fails_at_once)

    app = Starlette(routes=[Route("/midway", midway), Route("/early", early)])
    with ServerThreadless(app) as url:
        answer = httpx.get(f"{url}/midway")
        assert answer.status_code == 200
        lines = [json.loads(line) for line in answer.text.splitlines()]
        assert lines == [{"status": "working"}, {"error": "the runner failed"}]
        answer = httpx.get(f"{url}/early")
        assert answer.status_code == 503 and answer.json() == {"error": "too many requests"}


class ServerThreadless:
    """A bare uvicorn server (no engine) on a free port, for ASGI-level checks."""

    def __init__(self, app: Starlette) -> None:
        import threading

        import uvicorn

        from localllm.http.server import bind_socket

        self._sock = bind_socket("127.0.0.1", 0)
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        while not self._server.started:
            time.sleep(0.01)
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join()
        self._sock.close()


# --------------------------------------------------------------------------- slow clients

SOCKET_DEADLINE = 30.0  # how long a test waits on a socket before it fails; the server's bounds are far below


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SOCKET_DEADLINE
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def connect(server: ServerThread) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_DEADLINE)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def read_response(sock: socket.socket) -> bytes:
    """One response: its head, then as many body bytes as its Content-Length says."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection mid-response: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return head + b"\r\n\r\n" + body


def request_head(server: ServerThread, method: str, path: str, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture
def impatient(tmp_path: Path) -> Iterator[ServerThread]:
    """A server that waits half a second for headers and for each piece of a body."""
    with ServerThread(lambda: localllm.Engine(tmp_path), header_timeout=0.5, body_timeout=0.5) as running:
        yield running


@pytest.mark.parametrize("path", ["/api/generate", "/v1/chat/completions", "/api/blobs/sha256:" + "0" * 64])
def test_a_stalled_body_gets_408_and_the_connection_closes(impatient: ServerThread, path: str) -> None:
    body = json.dumps({"model": "smollm2", "prompt": "Hi", "messages": []}).encode()
    with connect(impatient) as sock:
        sock.sendall(request_head(impatient, "POST", path, len(body)) + body[: len(body) // 2])
        answer = read_until_closed(sock)  # the rest of the body is never sent
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"stalled" in answer and b"connection: close" in answer.lower()
    wait_for(lambda: impatient.open_connections == 0, "the stalled connection was held")


def test_headers_that_never_end_close_the_connection(impatient: ServerThread) -> None:
    with connect(impatient) as silent:
        assert read_until_closed(silent) == b""  # connected, sent nothing
    with connect(impatient) as dribbler:
        dribbler.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # the headers never end
        assert read_until_closed(dribbler) == b""
    with connect(impatient) as kept_alive:  # a kept-alive connection's next request is bounded too
        kept_alive.sendall(request_head(impatient, "GET", "/api/version"))
        assert read_response(kept_alive).startswith(b"HTTP/1.1 200 ")
        kept_alive.sendall(b"GET /api/version HTTP/1.1\r\n")
        assert read_until_closed(kept_alive) == b""
    with connect(impatient) as prompt:  # a client that sends its request at once is served
        prompt.sendall(request_head(impatient, "GET", "/api/version"))
        assert read_response(prompt).startswith(b"HTTP/1.1 200 ")


def test_connections_beyond_the_limit_get_503(tmp_path: Path) -> None:
    with ServerThread(lambda: localllm.Engine(tmp_path), max_connections=2) as server:
        with connect(server) as first, connect(server):
            third = connect(server)
            wait_for(lambda: server.open_connections == 3, "the server did not take the connections")
            third.sendall(request_head(server, "GET", "/api/version"))
            assert read_response(third).startswith(b"HTTP/1.1 503 ")
            third.close()
            first.close()
            wait_for(lambda: server.open_connections == 1, "closed connections were still counted")
            with connect(server) as another:  # within the limit again: served
                wait_for(lambda: server.open_connections == 2, "the server did not take the connection")
                another.sendall(request_head(server, "GET", "/api/version"))
                assert read_response(another).startswith(b"HTTP/1.1 200 ")


def test_bounds_must_be_positive() -> None:
    for bounds in ({"max_connections": 0}, {"header_timeout": 0}, {"body_timeout": -1.0}):
        with pytest.raises(ValueError, match="must be"):
            ServerThread(lambda: localllm.Engine(), **bounds)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- statuses, binding, import


def test_error_statuses() -> None:
    assert status_for(localllm.ModelNotFound("x")) == 404
    assert status_for(localllm.QueueFull("x")) == 503
    assert status_for(localllm.InvalidOptions("x")) == 400
    assert status_for(localllm.CapabilityError("x")) == 400
    assert status_for(localllm.InvalidModelName("x")) == 400
    assert status_for(localllm.ModelLoadError("x")) == 500
    assert status_for(localllm.InsufficientMemory("x")) == 500
    assert status_for(APIError(413, "x")) == 413
    assert status_for(RuntimeError("x")) == 500


def test_only_loopback_unless_allowed(caplog: pytest.LogCaptureFixture) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10")
    with pytest.raises(ValueError, match="allow_remote"):
        ServerThread(lambda: localllm.Engine(), host="0.0.0.0")
    with caplog.at_level("WARNING", logger="localllm.http"):
        remote = ServerThread(lambda: localllm.Engine(), host="0.0.0.0", allow_remote=True)
        remote.stop()
    assert any("0.0.0.0" in record.getMessage() for record in caplog.records)


def test_import_without_the_http_extra_names_the_install_command() -> None:
    code = "import sys; sys.modules['starlette'] = None; import localllm.http"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "pip install 'localllm[http]'" in result.stderr
