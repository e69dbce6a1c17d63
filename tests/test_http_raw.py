"""The HTTP shim at the wire: bad requests, limits, statuses, disconnects, binding."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
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
