"""The `localllm` command, run as the installed console script (a subprocess per command)."""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from servers import OCIRegistry, tiny_gguf

import localllm
from localllm.cli.format import parse_time
from localllm.cli.parser import build_parser
from localllm.http import ServerThread
from localllm.http.server import bind_socket

LOCALLLM = Path(sys.executable).parent / "localllm"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-home")


@pytest.fixture(scope="module")
def env(home: Path) -> dict[str, str]:
    values = dict(os.environ)
    values["LOCALLLM_HOME"] = str(home)
    values["LOCALLLM_HOST"] = "127.0.0.1:9"  # nothing listens there: ps and stop use their own engine
    values["LOCALLLM_NUM_PARALLEL"] = "1"
    values.pop("LOCALLLM_MODELS", None)
    return values


def cli(
    env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LOCALLLM), *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def model(env: dict[str, str], smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("modelfile")
    (folder / "Modelfile").write_text(
        f"FROM {smollm2_path}\nPARAMETER temperature 0\nPARAMETER num_predict 12\n"
        "PARAMETER num_ctx 1024\nPARAMETER num_thread 1\n"
        'SYSTEM """You are a helpful assistant."""\nLICENSE apache-2.0\n'
    )
    result = cli(env, "create", "smollm2", "-f", str(folder / "Modelfile"))
    assert result.returncode == 0, result.stderr
    assert "success" in result.stderr.splitlines()[-1]
    return "smollm2"


def test_version_and_help(env: dict[str, str]) -> None:
    result = cli(env, "--version")
    assert result.returncode == 0 and result.stdout == f"localllm version is {localllm.__version__}\n"
    result = cli(env, "--help")
    assert result.returncode == 0
    for command in ("serve", "create", "show", "run", "embed", "stop", "pull", "push", "list", "ps", "cp", "rm"):
        assert command in result.stdout


def test_list(env: dict[str, str], model: str) -> None:
    result = cli(env, "list")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    row = next(r for r in rows if r.startswith("smollm2:latest"))
    assert re.match(r"smollm2:latest\s{4,}[0-9a-f]{12}\s{4,}98 MB\s{4,}(Less than a second|\d+ seconds?) ago$", row)
    assert cli(env, "ls", "smo").stdout.splitlines()[1].startswith("smollm2:latest")
    assert len(cli(env, "ls", "zzz").stdout.splitlines()) == 1


def test_show(env: dict[str, str], model: str) -> None:
    result = cli(env, "show", model)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("  Model\n")
    assert re.search(r"^    architecture\s+llama$", text, re.M)
    assert re.search(r"^    context length\s+8192$", text, re.M)
    assert re.search(r"^    quantization\s+Q4_1$", text, re.M)
    assert "  Capabilities\n    completion" in text
    assert re.search(r"^    temperature\s+0$", text, re.M)
    assert "  System\n    You are a helpful assistant." in text
    assert "  License\n    apache-2.0" in text

    assert "FROM " in cli(env, "show", model, "--modelfile").stdout
    assert re.search(r"^num_predict\s+12$", cli(env, "show", model, "--parameters").stdout, re.M)
    assert cli(env, "show", model, "--system").stdout == "You are a helpful assistant."
    assert "im_start" in cli(env, "show", model, "--template").stdout
    both = cli(env, "show", model, "--system", "--license")
    assert both.returncode == 1 and both.stderr.startswith("Error: only one of")


def test_run_one_shot(env: dict[str, str], model: str) -> None:
    result = cli(env, "run", model, "Name", "a", "color.", "--verbose")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and result.stdout.endswith("\n\n")
    assert re.search(r"^eval count:\s+\d+ token\(s\)$", result.stderr, re.M)
    assert "total duration:" in result.stderr and "eval rate:" in result.stderr

    piped = cli(env, "run", model, stdin="Name a color.")
    assert piped.returncode == 0 and piped.stdout == cli(env, "run", model, "Name a color.").stdout  # greedy


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "m", "--keepalive", "10m", "hi"], {"model": "m", "keepalive": "10m", "prompt": ["hi"]}),
        (["run", "--keepalive", "10m", "m", "hi", "there"], {"model": "m", "prompt": ["hi", "there"]}),
        (["run", "m", "hi", "--verbose", "there"], {"verbose": True, "prompt": ["hi", "there"]}),
        (["run", "m", "--think", "hi"], {"think": True, "prompt": ["hi"]}),
        (["run", "m", "--think=high", "hi"], {"think": "high", "prompt": ["hi"]}),
        (["run", "m", "--think=false", "--hidethinking", "hi"], {"think": False, "hidethinking": True}),
        (["run", "m", "hi"], {"think": None, "truncate": None, "dimensions": None}),
        (["run", "m", "--", "--not-an-option"], {"prompt": ["--not-an-option"]}),
        (["embed", "m", "--dimensions", "8", "a", "text"], {"dimensions": 8, "text": ["a", "text"]}),
        (["embed", "--no-truncate", "m", "a"], {"truncate": False}),
        (["embed", "m", "--truncate=false", "a"], {"truncate": False}),
    ],
)
def test_flags_anywhere(argv: list[str], expected: dict[str, object]) -> None:
    args = build_parser().parse_args(argv)
    assert {name: getattr(args, name) for name in expected} == expected


def test_run_takes_flags_anywhere(env: dict[str, str], model: str) -> None:
    after = cli(env, "run", model, "--keepalive", "10m", "--think=false", "--hidethinking", "Name a color.")
    before = cli(env, "run", "--verbose", "--keepalive", "10m", model, "Name", "a", "color.")
    assert after.returncode == 0 and before.returncode == 0, after.stderr + before.stderr
    assert after.stdout.strip() and after.stdout == before.stdout  # greedy: the same answer to the same prompt
    assert "eval count:" in before.stderr
    # --think takes no value unless written --think=LEVEL: the prompt after it reaches the model,
    # which (SmolLM2 does not think) refuses the request rather than the parser refusing "Hi".
    refused = cli(env, "run", model, "--think", "Hi")
    assert refused.returncode == 1 and "does not support thinking" in refused.stderr, refused.stderr


def test_run_interactive_through_stdin(env: dict[str, str], model: str) -> None:
    script = "\n".join(
        [
            "/set parameter num_predict 6",
            "/set parameter seed 7",
            "/set parameter num_predict many",
            "Hello!",
            "/show parameters",
            "/clear",
            '"""',
            "Say hello",
            'in one word."""',
            "/unknown",
            "/bye",
            "never sent",
        ]
    )
    result = cli(env, "run", model, "-i", stdin=script + "\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Set parameter 'num_predict' to '6'" in out
    assert "Couldn't set parameter" in out
    assert "User defined parameters:" in out and re.search(r"num_predict\s+6", out)
    assert "Cleared session context" in out
    assert "Unknown command '/unknown'. Type /? for help" in out
    assert out.count(">>> ") >= 8 and "... " in out
    replies = [
        part
        for part in out.split(">>> ")
        if part.strip() and not part.startswith(("Set", "Couldn't", "Model", "Cleared", "Unknown"))
    ]
    assert replies, out


def test_run_interactive_in_a_terminal(env: dict[str, str], model: str) -> None:
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [str(LOCALLLM), "run", model], stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True
    )
    os.close(follower)
    output = b""

    def read_until(marker: bytes, timeout: float = 120) -> bytes:
        nonlocal output
        deadline = time.monotonic() + timeout
        while marker not in output:
            assert time.monotonic() < deadline, output.decode(errors="replace")
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    output += os.read(leader, 4096)
                except OSError:
                    break
        found = output
        output = b""
        return found

    try:
        read_until(b">>> ")
        os.write(leader, b"Hi\n")
        reply = read_until(b">>> ")
        assert len(reply.replace(b"Hi", b"").strip()) > 0
        os.write(leader, b"/?\n")
        assert b"/bye" in read_until(b">>> ")
        os.write(leader, b"/bye\n")
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)


def test_load_and_save_in_the_chat(env: dict[str, str], model: str) -> None:
    script = "\n".join(
        [
            "/set system You are a pirate.",
            "/set parameter seed 42",
            "Hello!",
            "/save pirate",
            "/save",
            "/save not a name",
            "/load no-such-model",
            "/load pirate",
            "/show system",
            "/help",
            "/bye",
        ]
    )
    result = cli(env, "run", model, "-i", stdin=script + "\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Created new model 'pirate'" in out
    assert "Usage:\n  /save <modelname>" in out
    assert "Couldn't find model 'no-such-model'" in out
    assert "Loading model 'pirate'\n>>> Hello!\n" in out  # the saved conversation, shown again
    assert "You are a pirate.\n" in out.split("Loading model 'pirate'", 1)[1]  # the saved model's system message
    assert "/load <model>" in result.stderr and "/save <model>" in result.stderr

    saved = cli(env, "show", "pirate", "--modelfile").stdout
    assert "SYSTEM You are a pirate." in saved
    assert re.search(r"^PARAMETER seed 42$", saved, re.M) and re.search(r"^PARAMETER num_predict 12$", saved, re.M)
    assert "MESSAGE user Hello!" in saved and "MESSAGE assistant " in saved
    assert cli(env, "rm", "pirate").returncode == 0


def test_embed(env: dict[str, str], minilm_gguf: Path) -> None:
    result = cli(env, "embed", str(minilm_gguf), "--dimensions", "8", "The sky is blue.")
    assert result.returncode == 0, result.stderr
    vector = json.loads(result.stdout)
    assert len(vector) == 8 and all(isinstance(x, float) for x in vector)
    assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-4)  # normalised again after the cut
    same = cli(env, "run", str(minilm_gguf), "The", "sky", "is", "blue.", "--dimensions", "8")
    assert same.returncode == 0 and json.loads(same.stdout) == pytest.approx(vector, abs=1e-5)

    long_text = "word " * 700  # from stdin, longer than MiniLM's 512-token context
    refused = cli(env, "embed", str(minilm_gguf), "--no-truncate", stdin=long_text)
    assert refused.returncode == 1 and "context" in refused.stderr, refused.stderr


def test_push_fails_clearly(env: dict[str, str]) -> None:
    result = cli(env, "push", "smollm2")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("Error: cannot push 'smollm2': localllm does not push models to a registry")
    assert len(result.stderr.splitlines()) == 1


def test_cp_and_rm(env: dict[str, str], model: str) -> None:
    result = cli(env, "cp", model, "other")
    assert result.returncode == 0 and result.stdout == "copied 'smollm2' to 'other'\n"
    assert "other:latest" in cli(env, "list").stdout
    result = cli(env, "rm", "other")
    assert result.returncode == 0 and result.stdout == "deleted 'other'\n"
    assert "other:latest" not in cli(env, "list").stdout


def test_errors_are_one_line(env: dict[str, str], model: str) -> None:
    for args in (("run", "no-such-model", "hi"), ("show", "no-such-model"), ("rm", "no-such-model"), ("cp", "x", "y")):
        result = cli(env, *args)
        assert result.returncode == 1, args
        assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "not found" in result.stderr
    missing = cli(env, "create", "x", "-f", "/no/such/Modelfile")
    assert missing.returncode == 1 and missing.stderr.startswith("Error: ")
    assert cli(env, "stop", "no-such-model").stderr == 'Error: couldn\'t find model "no-such-model" to stop\n'


def test_pull_shows_progress(env: dict[str, str]) -> None:
    with OCIRegistry() as registry:
        registry.add_model("library/tiny", "latest", tiny_gguf(seed=5, rows=800))
        result = cli(env, "pull", f"{registry.host}/library/tiny")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "pulling manifest" and lines[-1] == "success"
    assert any(re.match(r"pulling [0-9a-f]{12}: 100% ▕█+▏ \d+ KB$", line) for line in lines), lines
    assert "verifying sha256 digest" in lines and "writing manifest" in lines
    assert f"{registry.host}/library/tiny:latest" in cli(env, "list").stdout
    assert cli(env, "rm", f"{registry.host}/library/tiny").returncode == 0


def test_ps_and_stop_through_a_running_server(env: dict[str, str], home: Path, model: str) -> None:
    alone = cli(env, "ps")
    assert alone.returncode == 0 and alone.stdout.split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    with ServerThread(lambda: localllm.Engine(home, num_parallel=1)) as server:
        served = {**env, "LOCALLLM_HOST": f"127.0.0.1:{server.port}"}
        httpx.post(f"{server.url}/api/generate", json={"model": model, "keep_alive": "10m"}, timeout=120)
        running = cli(served, "ps")
        assert running.returncode == 0, running.stderr
        row = running.stdout.splitlines()[1]
        assert re.match(r"smollm2:latest\s+[0-9a-f]{12}\s+\d+ MB\s+100% CPU\s+1024\s+(9|10) minutes from now$", row), (
            row
        )
        assert cli(served, "stop", model).returncode == 0
        assert len(cli(served, "ps").stdout.splitlines()) == 1


def test_run_through_a_running_server(env: dict[str, str], home: Path, model: str) -> None:
    """With a server at LOCALLLM_HOST (or OLLAMA_HOST), run asks it: --keepalive keeps the model warm there."""
    with ServerThread(lambda: localllm.Engine(home, num_parallel=1)) as server:
        served = {**env, "LOCALLLM_HOST": f"127.0.0.1:{server.port}"}
        result = cli(served, "run", model, "--keepalive", "10m", "Name a color.")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip()
        (loaded,) = httpx.get(f"{server.url}/api/ps").json()["models"]
        assert loaded["name"] == "smollm2:latest"
        expires = parse_time(loaded["expires_at"])
        assert expires is not None
        assert 9 * 60 < (expires - datetime.datetime.now(datetime.timezone.utc)).total_seconds() <= 10 * 60

        ollama_env = {name: value for name, value in served.items() if name != "LOCALLLM_HOST"}
        ollama_env["OLLAMA_HOST"] = served["LOCALLLM_HOST"]
        chat = cli(ollama_env, "run", model, "-i", stdin="Hello!\n/save from-server\n/bye\n")
        assert chat.returncode == 0 and "Created new model 'from-server'" in chat.stdout, chat.stderr
        shown = httpx.post(f"{server.url}/api/show", json={"model": "from-server"}).json()
        assert [m["role"] for m in shown["messages"]] == ["user", "assistant"]
        httpx.request("DELETE", f"{server.url}/api/delete", json={"model": "from-server"}).raise_for_status()

        missing = cli(served, "run", "no-such-model", "hi")
        assert missing.returncode == 1 and "not found" in missing.stderr


def test_serve(env: dict[str, str], model: str) -> None:
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    process = subprocess.Popen(
        [str(LOCALLLM), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.HTTPError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert answer.text == "Ollama is running"
        assert "smollm2:latest" in {m["name"] for m in httpx.get(f"http://127.0.0.1:{port}/api/tags").json()["models"]}
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode in (0, 130), stderr
    assert f"listening on http://127.0.0.1:{port}" in stderr

    refused = cli(env, "serve", "--host", "0.0.0.0", "--port", str(port))
    assert refused.returncode == 1 and "allow-remote" in refused.stderr
