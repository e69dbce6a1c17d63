"""The HTTP shim is safe to leave running: who may talk to it, what a request may name, what it may hold.

Real servers on 127.0.0.1, real clients. A web page must not drive the server (Host and
Origin checks), a request names models and never the server's files (unless the server
allows local paths, and then only regular files), malformed input is a 4xx naming the
field, and no error message shows where the store lives.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from servers import localllm_shim, tiny_gguf

import localllm
from localllm.http import ServerThread
from localllm.http.security import is_local_host

EVIL = "http://evil.example"
QUICK = 15.0  # seconds: a request that opened a FIFO or read /dev/zero would not answer in time


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[ServerThread]:
    """The default server (names only), with SmolLM2 stored as "smollm2"."""
    with localllm_shim(tmp_path_factory.mktemp("home"), smollm2_path) as running:
        yield running


@pytest.fixture
def http(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def paths_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A server that allows local paths (no model stored)."""
    with localllm_shim(tmp_path_factory.mktemp("home"), allow_local_paths=True) as running:
        yield running


@pytest.fixture
def paths_http(paths_server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=paths_server.url, timeout=QUICK) as client:
        yield client


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("files") / "tiny.gguf"
    path.write_bytes(tiny_gguf(seed=7))
    return path


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pipe.gguf"
    os.mkfifo(path)
    yield path


def error_of(answer: httpx.Response) -> str:
    error = answer.json()["error"]
    return str(error["message"] if isinstance(error, dict) else error)


# --------------------------------------------------------------------------- Host


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:11434", "app.localhost:8080", "127.0.0.1:5", "[::1]:11434", "::1", "10.1.2.3", "0.0.0.0"],
)
def test_local_hosts(host: str) -> None:
    assert is_local_host(host, "workstation")
    assert is_local_host("WorkStation:11434", "workstation")


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:11434", "localhost.evil.example", "8.8.8.8", "[2606:4700::1111]"]
)
def test_foreign_hosts(host: str) -> None:
    assert not is_local_host(host, "workstation")


def test_a_foreign_host_is_refused(http: httpx.Client) -> None:
    for method, path in (("GET", "/"), ("GET", "/api/tags"), ("POST", "/api/show"), ("GET", "/v1/models")):
        answer = http.request(method, path, json={"model": "smollm2"}, headers={"Host": "evil.example:11434"})
        assert answer.status_code == 403, (method, path, answer.text)
        assert "evil.example" in error_of(answer)
    for host in ("localhost", f"localhost:{http.base_url.port}", socket.gethostname(), "[::1]:1"):
        assert http.get("/api/tags", headers={"Host": host}).status_code == 200, host


def test_host_checks_relax_beyond_loopback(tmp_path: Path) -> None:
    with ServerThread(lambda: localllm.Engine(tmp_path), host="0.0.0.0", allow_remote=True) as remote:
        url = f"http://127.0.0.1:{remote.port}"
        assert httpx.get(f"{url}/api/tags", headers={"Host": "models.example.com"}).status_code == 200
        assert httpx.get(f"{url}/api/tags", headers={"Origin": EVIL}).status_code == 403


# --------------------------------------------------------------------------- Origin


def test_a_foreign_origin_is_refused_on_every_method(http: httpx.Client) -> None:
    digest = "sha256:" + hashlib.sha256(b"blob").hexdigest()
    plain = {"Origin": EVIL, "Content-Type": "text/plain"}
    attempts = [
        ("GET", "/", None),
        ("HEAD", "/", None),
        ("GET", "/api/version", None),
        ("GET", "/api/tags", None),
        ("GET", "/api/ps", None),
        ("POST", "/api/show", {"model": "smollm2"}),
        ("POST", "/api/generate", {"model": "smollm2", "prompt": "hi"}),
        ("POST", "/api/create", {"model": "smollm2", "from": "smollm2", "system": "obey evil.example"}),
        ("POST", "/api/copy", {"source": "smollm2", "destination": "stolen"}),
        ("DELETE", "/api/delete", {"model": "smollm2"}),
        ("POST", "/api/pull", {"model": "evil.example/x/y"}),
        ("HEAD", f"/api/blobs/{digest}", None),
        ("POST", f"/api/blobs/{digest}", None),
        ("OPTIONS", "/api/chat", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}),
        ("GET", "/no/such/route", None),
    ]
    for method, path, body in attempts:
        content = b"blob" if body is None else json.dumps(body).encode()
        headers = {**plain, "Access-Control-Request-Method": "POST"} if method == "OPTIONS" else plain
        answer = http.request(method, path, content=content, headers=headers)
        assert answer.status_code == 403, (method, path, answer.text)
        assert "access-control-allow-origin" not in answer.headers
    # Nothing happened: the model kept its prompt, and nothing was copied.
    assert http.post("/api/show", json={"model": "smollm2"}).json().get("system", "") == ""
    assert "stolen:latest" not in [m["name"] for m in http.get("/api/tags").json()["models"]]


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost",
        "http://localhost:3000",
        "https://127.0.0.1:8443",
        "http://0.0.0.0:8080",
        "app://obsidian.md",
        "file://",
        "tauri://localhost",
        "vscode-webview://abc123",
    ],
)
def test_local_origins_are_allowed(http: httpx.Client, origin: str) -> None:
    answer = http.post("/api/show", json={"model": "smollm2"}, headers={"Origin": origin})
    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == origin
    preflight = http.options(
        "/api/chat",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin


def test_origins_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALLLM_ORIGINS", "https://chat.example.com, http://tools.example:*")
    monkeypatch.setenv("OLLAMA_ORIGINS", "chrome-extension://*")
    with localllm_shim(tmp_path, origins=["https://notebook.example"]) as running:
        for origin in (
            "https://chat.example.com",
            "http://tools.example:9000",
            "chrome-extension://abcdef",
            "https://notebook.example",
            "http://localhost:3000",
        ):
            answer = httpx.get(f"{running.url}/api/tags", headers={"Origin": origin})
            assert answer.status_code == 200, origin
        for origin in (EVIL, "http://chat.example.com", "https://chat.example.com.evil.example", "null"):
            assert httpx.get(f"{running.url}/api/tags", headers={"Origin": origin}).status_code == 403, origin


def test_clients_without_an_origin_work(server: ServerThread) -> None:
    with ollama.Client(host=server.url) as client:
        assert "smollm2:latest" in [m.model for m in client.list().models]
        assert client.generate("smollm2", "Hi", options={"num_predict": 2}).done
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        assert "smollm2:latest" in [m.id for m in client.models.list()]
    # curl -d sends a form content type: the body is still read as JSON
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    answer = httpx.post(f"{server.url}/api/show", content=b'{"model": "smollm2"}', headers=form)
    assert answer.status_code == 200, answer.text


# --------------------------------------------------------------------------- paths are not model names


MODEL_REQUESTS = [
    ("/api/show", lambda m: {"model": m}),
    ("/api/generate", lambda m: {"model": m, "prompt": "hi"}),
    ("/api/generate", lambda m: {"model": m, "prompt": "hi", "stream": False}),
    ("/api/chat", lambda m: {"model": m, "messages": [{"role": "user", "content": "hi"}]}),
    ("/api/embed", lambda m: {"model": m, "input": "hi"}),
    ("/api/embeddings", lambda m: {"model": m, "prompt": "hi"}),
    ("/v1/chat/completions", lambda m: {"model": m, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", lambda m: {"model": m, "prompt": "hi"}),
    ("/v1/embeddings", lambda m: {"model": m, "input": "hi"}),
]


def test_paths_as_models_are_refused_alike_whether_they_exist_or_not(
    http: httpx.Client, tmp_path: Path, tiny_file: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("the password is hunter2")
    pairs = [
        (str(secret), str(tmp_path / "missing.txt")),
        (str(tiny_file), str(tmp_path / "missing.gguf")),
        ("/etc/passwd", "/etc/no-such-file"),
        ("~/.bashrc", "~/.no-such-file"),
        ("./tests/conftest.py", "./tests/missing.py"),
        ("../main/README.md", "../main/missing.md"),
        ("C:\\Windows\\win.ini", "C:\\Windows\\missing.ini"),
        ("tiny.gguf", "missing.gguf"),
    ]
    for path, body in MODEL_REQUESTS:
        for present, absent in pairs:
            answers = [http.post(path, json=body(name)) for name in (present, absent)]
            assert [a.status_code for a in answers] == [400, 400], (path, present, answers[0].text)
            shown = [error_of(a).replace(name, "<path>") for a, name in zip(answers, (present, absent), strict=True)]
            assert shown[0] == shown[1], (path, shown)
            assert "'model'" in shown[0] and "hunter2" not in shown[0]
    for present, absent in pairs[:3]:
        answers = [http.get(f"/v1/models/{name}") for name in (present, absent)]
        assert [a.status_code for a in answers] == [400, 400], answers[0].text
        assert error_of(answers[0]).replace(present, "<path>") == error_of(answers[1]).replace(absent, "<path>")


def test_devices_and_fifos_as_models_answer_at_once(server: ServerThread, fifo: Path) -> None:
    with httpx.Client(base_url=server.url, timeout=QUICK) as quick:
        for name in ("/dev/zero", "/dev/stdin", str(fifo)):
            for path, body in MODEL_REQUESTS[:4]:
                assert quick.post(path, json=body(name)).status_code == 400, (name, path)


def test_a_name_that_is_also_a_file_here_is_a_model_not_the_file(
    http: httpx.Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``notes/work/todo.txt`` is a valid name (host/namespace/model) and a relative path: the file stays unread."""
    (tmp_path / "notes" / "work").mkdir(parents=True)
    (tmp_path / "notes" / "work" / "todo.txt").write_text("the password is hunter2")
    os.mkfifo(tmp_path / "notes" / "work" / "pipe")
    monkeypatch.chdir(tmp_path)
    missing = http.post("/api/show", json={"model": "notes/work/nothing"})
    assert missing.status_code == 404
    for name in ("notes/work/todo.txt", "notes/work/pipe"):
        for path, body in MODEL_REQUESTS[:4]:
            answer = http.post(path, json=body(name), timeout=QUICK)
            assert answer.status_code == 404, (name, path, answer.text)
            assert error_of(answer).replace(name, "<name>") == error_of(missing).replace("notes/work/nothing", "<name>")
        answer = http.post("/api/create", json={"model": "copy", "from": name, "stream": False}, timeout=QUICK)
        assert answer.status_code == 404 and "hunter2" not in answer.text


def test_create_takes_model_names_and_uploads_not_paths(http: httpx.Client, tiny_file: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.gguf")
    for field, body in (
        ("from", lambda p: {"from": p}),
        ("modelfile", lambda p: {"modelfile": f"FROM {p}\n"}),
        ("modelfile", lambda p: {"modelfile": f"FROM smollm2\nADAPTER {p}\n"}),
        ("modelfile", lambda p: {"modelfile": f"FROM smollm2\nFROM {p}\n"}),
    ):
        answers = [
            http.post("/api/create", json={"model": "made", "stream": False, **body(p)})
            for p in (str(tiny_file), missing)
        ]
        assert [a.status_code for a in answers] == [400, 400], answers[0].text
        assert f"'{field}'" in error_of(answers[0])
        assert error_of(answers[0]).replace(str(tiny_file), "<p>") == error_of(answers[1]).replace(missing, "<p>")
    for fifo_like in ("/dev/zero", "./Modelfile", "~/model.gguf"):
        answer = http.post("/api/create", json={"model": "made", "modelfile": f"FROM {fifo_like}", "stream": False})
        assert answer.status_code == 400, answer.text
    assert "made:latest" not in [m["name"] for m in http.get("/api/tags").json()["models"]]

    # What works: a stored model as `from` or FROM, and files uploaded as blobs.
    for body in ({"from": "smollm2", "system": "Be brief."}, {"modelfile": "FROM SmolLM2:latest\nSYSTEM Be brief.\n"}):
        answer = http.post("/api/create", json={"model": "made", "stream": False, **body})
        assert answer.json() == {"status": "success"}, answer.text
        assert http.post("/api/show", json={"model": "made"}).json()["system"] == "Be brief."
    data = tiny_file.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert http.post(f"/api/blobs/{digest}", content=data).status_code == 201
    answer = http.post("/api/create", json={"model": "tiny", "files": {"tiny.gguf": digest}, "stream": False})
    assert answer.json() == {"status": "success"}, answer.text


def test_a_draft_model_is_a_name_too(http: httpx.Client, tiny_file: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.gguf")
    requests = [
        (
            "/api/generate",
            "options.draft_model",
            lambda p: {"model": "smollm2", "prompt": "hi", "options": {"draft_model": p}},
        ),
        (
            "/api/chat",
            "options.draft_model",
            lambda p: {"model": "smollm2", "messages": [], "options": {"draft_model": p}},
        ),
        (
            "/api/create",
            "parameters.draft_model",
            lambda p: {"model": "drafted", "from": "smollm2", "parameters": {"draft_model": p}},
        ),
        (
            "/api/create",
            "modelfile",
            lambda p: {"model": "drafted", "modelfile": f"FROM smollm2\nPARAMETER draft_model {p}\n"},
        ),
    ]
    for path, field, body in requests:
        answers = [http.post(path, json={**body(p), "stream": False}) for p in (str(tiny_file), missing)]
        assert [a.status_code for a in answers] == [400, 400], (path, answers[0].text)
        assert f"'{field}'" in error_of(answers[0]), error_of(answers[0])
        assert error_of(answers[0]).replace(str(tiny_file), "<p>") == error_of(answers[1]).replace(missing, "<p>")
    assert "drafted:latest" not in [m["name"] for m in http.get("/api/tags").json()["models"]]


def test_names_are_checked_where_models_are_only_named(http: httpx.Client) -> None:
    assert http.post("/api/copy", json={"source": "/etc/passwd", "destination": "x"}).status_code == 400
    answer = http.post("/api/copy", json={"source": "smollm2", "destination": "../../escape"})
    assert answer.status_code == 400 and "'destination'" in error_of(answer)
    assert http.request("DELETE", "/api/delete", json={"model": "/etc/passwd"}).status_code == 400
    answer = http.post("/api/show", json={"model": "h" * 300 + "/library/model"})
    assert answer.status_code == 400 and "'model'" in error_of(answer)


def test_local_paths_when_allowed_are_regular_files_only(
    paths_http: httpx.Client, tiny_file: Path, fifo: Path, tmp_path: Path
) -> None:
    assert paths_http.post("/api/show", json={"model": str(tiny_file)}).status_code == 200
    answer = paths_http.post("/api/create", json={"model": "local", "from": str(tiny_file), "stream": False})
    assert answer.json() == {"status": "success"}, answer.text
    for refused in (str(fifo), "/dev/zero", str(tmp_path)):
        answer = paths_http.post("/api/show", json={"model": refused})
        assert answer.status_code == 400 and "not a regular file" in error_of(answer), answer.text
        for body in (
            {"from": refused},
            {"modelfile": f"FROM {refused}\n"},
            {"modelfile": f"FROM local\nADAPTER {refused}\n"},
        ):
            answer = paths_http.post("/api/create", json={"model": "other", "stream": False, **body})
            assert answer.status_code == 400 and "not a regular file" in error_of(answer), (body, answer.text)


def test_serve_allow_local_paths(tmp_path: Path, tiny_file: Path) -> None:
    from localllm.http.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "LOCALLLM_HOME": str(tmp_path)}
    env.pop("LOCALLLM_HOST", None)
    command = [str(Path(sys.executable).parent / "localllm"), "serve", "--port", str(port), "--allow-local-paths"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.HTTPError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        answer = httpx.post(f"http://127.0.0.1:{port}/api/show", json={"model": str(tiny_file)}, timeout=60)
        assert answer.status_code == 200, answer.text
    finally:
        process.terminate()
        process.communicate(timeout=60)


# --------------------------------------------------------------------------- malformed input is a 4xx naming the field


def test_deep_nesting_is_400(http: httpx.Client) -> None:
    deep = b"[" * 10_000 + b"]" * 10_000
    for path in ("/api/generate", "/api/chat", "/v1/chat/completions"):
        for body in (deep, b'{"model": "smollm2", "format": ' + deep + b"}"):
            answer = http.post(path, content=body)
            assert answer.status_code == 400, (path, answer.text)
            assert "nested" in error_of(answer)
    schema: dict[str, object] = {"type": "string"}
    for _ in range(30):  # 61 levels: a deep but fair JSON schema still works
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    body = {"model": "smollm2", "prompt": "hi", "format": schema, "stream": False, "options": {"num_predict": 2}}
    assert http.post("/api/generate", json=body).status_code == 200


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999"])
def test_non_finite_numbers_are_400_naming_the_field(http: httpx.Client, number: bytes) -> None:
    answer = http.post(
        "/api/generate", content=b'{"model": "smollm2", "prompt": "hi", "options": {"temperature": ' + number + b"}}"
    )
    assert answer.status_code == 400 and "'options.temperature'" in error_of(answer), answer.text
    answer = http.post(
        "/v1/chat/completions",
        content=b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": '
        + number
        + b"}",
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "temperature" and "'temperature'" in error_of(answer)


def test_integers_beyond_64_bits_are_400(http: httpx.Client) -> None:
    answer = http.post("/api/generate", json={"model": "smollm2", "options": {"seed": 10**30}})
    assert answer.status_code == 400 and "'options.seed'" in error_of(answer)


@pytest.mark.parametrize("context", [[-1], [1, 2, -5], [1 << 40], ["a"], [1.5], 7])
def test_bad_context_ids_are_400(http: httpx.Client, context: object) -> None:
    answer = http.post("/api/generate", json={"model": "smollm2", "prompt": "hi", "context": context})
    assert answer.status_code == 400 and "'context'" in error_of(answer), answer.text


def test_context_ids_beyond_the_vocabulary_are_400(http: httpx.Client) -> None:
    for stream in (True, False):
        body = {"model": "smollm2", "prompt": "hi", "context": [1, 999_999], "stream": stream}
        answer = http.post("/api/generate", json=body)
        assert answer.status_code == 400 and "'context'" in error_of(answer), answer.text


def test_lone_surrogates_are_400_naming_the_field(http: httpx.Client) -> None:
    for format_ in (b'"\\ud800"', b'{"type": "object", "properties": {"\\udc00x": {"type": "string"}}}'):
        answer = http.post("/api/generate", content=b'{"model": "smollm2", "prompt": "hi", "format": ' + format_ + b"}")
        assert answer.status_code == 400 and "'format" in error_of(answer), answer.text
    answer = http.post(
        "/v1/chat/completions", content=b'{"model": "smollm2", "messages": [{"role": "user", "content": "a\\udfffb"}]}'
    )
    assert answer.status_code == 400 and "messages[0].content" in error_of(answer)


@pytest.mark.parametrize(
    "calls",
    [
        "call it",
        ["call it"],
        [{"function": {"arguments": {}}}],
        [{"function": {"name": "f", "arguments": [1]}}],
        [{"function": {"name": "f", "arguments": "{not json"}}],
        [{"function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}],
        [{"function": {"name": "f", "arguments": '{"a": NaN}'}}],
        [{"function": {"name": "f", "arguments": {}, "index": "first"}}],
    ],
)
def test_malformed_tool_calls_are_400(http: httpx.Client, calls: object) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    for path in ("/api/chat", "/v1/chat/completions"):
        answer = http.post(path, json={"model": "smollm2", "messages": messages, "stream": False})
        assert answer.status_code == 400 and "messages[1].tool_calls" in error_of(answer), (path, answer.text)


# --------------------------------------------------------------------------- no server paths in error messages


def test_errors_do_not_show_where_the_store_is(server: ServerThread, http: httpx.Client) -> None:
    home = str(server.engine.settings.home)
    data = b"this is not a model"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert http.post(f"/api/blobs/{digest}", content=data).status_code in (200, 201)
    answer = http.post("/api/create", json={"model": "junk", "files": {"junk.gguf": digest}, "stream": False})
    assert answer.status_code == 400 and digest in error_of(answer) and home not in answer.text, answer.text
    config = b'{"architectures": ["BertModel"]}'
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    assert http.post(f"/api/blobs/{config_digest}", content=config).status_code in (200, 201)
    files = {"config.json": config_digest, "model.safetensors": digest}
    answer = http.post("/api/create", json={"model": "junk", "files": files, "stream": False})
    assert answer.status_code == 400 and "'files'" in error_of(answer), answer.text
    assert "/tmp" not in answer.text and home not in answer.text

    manifest = Path(home) / "models" / "manifests" / "registry.ollama.ai" / "library" / "damaged" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{not json")
    try:
        for path, body in (("/api/show", {"model": "damaged"}), ("/api/generate", {"model": "damaged"})):
            answer = http.post(path, json=body)
            assert answer.status_code >= 400 and home not in answer.text, answer.text
        answer = http.post(
            "/v1/chat/completions", json={"model": "damaged", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert answer.status_code >= 400 and home not in answer.text
    finally:
        manifest.unlink()
