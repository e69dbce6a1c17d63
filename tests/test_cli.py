"""The `localllm` command, run as the installed console script (a subprocess per command)."""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import OCIRegistry, tiny_gguf
from test_lora import write_lora

import localllm
from localllm.cli.format import parse_time
from localllm.cli.parser import build_parser
from localllm.cli.remote import server_url
from localllm.http.server import bind_socket

LOCALLLM = Path(sys.executable).parent / "localllm"
COMMANDS = ("serve", "create", "show", "run", "embed", "stop", "pull", "push", "list", "ps", "cp", "rm")


def not_connecting(host: str) -> str:
    return (
        f"Error: could not connect to the localllm server at http://{host} "
        "(is `localllm serve` running? --local runs the command in this process)\n"
    )


@pytest.fixture(scope="module")
def refusing_host() -> Iterator[str]:
    """host:port of a loopback port held but not listened on: every connection to it is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-home")


@pytest.fixture(scope="module")
def env(home: Path, refusing_host: str) -> dict[str, str]:
    """The environment of the commands: the local store in `home`, a server that refuses (so `--local` is needed)."""
    values = dict(os.environ)
    values["LOCALLLM_HOME"] = str(home)
    values["LOCALLLM_HOST"] = refusing_host
    values["LOCALLLM_NUM_PARALLEL"] = "1"
    values.pop("LOCALLLM_MODELS", None)
    values.pop("OLLAMA_HOST", None)
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


def local(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The command run in this process, on the local store."""
    return cli(env, "--local", *args, stdin=stdin)


@pytest.fixture(scope="module")
def model(env: dict[str, str], smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("modelfile")
    (folder / "Modelfile").write_text(
        f"FROM {smollm2_path}\nPARAMETER temperature 0\nPARAMETER num_predict 12\n"
        "PARAMETER num_ctx 1024\nPARAMETER num_thread 1\n"
        'SYSTEM """You are a helpful assistant."""\nLICENSE apache-2.0\n'
    )
    result = local(env, "create", "smollm2", "-f", str(folder / "Modelfile"))
    assert result.returncode == 0, result.stderr
    assert "success" in result.stderr.splitlines()[-1]
    return "smollm2"


def test_version_and_help(env: dict[str, str]) -> None:
    result = cli(env, "--version")
    assert result.returncode == 0 and result.stdout == f"localllm version is {localllm.__version__}\n"
    result = cli(env, "--help")
    assert result.returncode == 0
    for command in (*COMMANDS, "--local"):
        assert command in result.stdout


def test_list(env: dict[str, str], model: str) -> None:
    result = local(env, "list")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    row = next(r for r in rows if r.startswith("smollm2:latest"))
    assert re.match(r"smollm2:latest\s{4,}[0-9a-f]{12}\s{4,}98 MB\s{4,}(Less than a second|\d+ seconds?) ago$", row)
    assert cli(env, "ls", "smo", "--local").stdout.splitlines()[1].startswith("smollm2:latest")
    assert len(local(env, "ls", "zzz").stdout.splitlines()) == 1


def test_show(env: dict[str, str], model: str) -> None:
    result = local(env, "show", model)
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

    assert "FROM " in local(env, "show", model, "--modelfile").stdout
    assert re.search(r"^num_predict\s+12$", local(env, "show", model, "--parameters").stdout, re.M)
    assert local(env, "show", model, "--system").stdout == "You are a helpful assistant."
    assert "im_start" in local(env, "show", model, "--template").stdout
    both = local(env, "show", model, "--system", "--license")
    assert both.returncode == 1 and both.stderr.startswith("Error: only one of")


def test_run_one_shot(env: dict[str, str], model: str) -> None:
    result = local(env, "run", model, "Name", "a", "color.", "--verbose")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and result.stdout.endswith("\n\n")
    assert re.search(r"^eval count:\s+\d+ token\(s\)$", result.stderr, re.M)
    assert "total duration:" in result.stderr and "eval rate:" in result.stderr

    piped = local(env, "run", model, stdin="Name a color.")
    assert piped.returncode == 0 and piped.stdout == local(env, "run", model, "Name a color.").stdout  # greedy


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
        (["list"], {"local": False}),
        (["--local", "list"], {"local": True}),
        (["ls", "--local", "smo"], {"local": True, "prefix": "smo"}),
        (["run", "m", "hi", "--local"], {"local": True, "prompt": ["hi"]}),
        (["--local", "stop", "m"], {"local": True, "model": "m"}),
    ],
)
def test_flags_anywhere(argv: list[str], expected: dict[str, object]) -> None:
    args = build_parser().parse_args(argv)
    assert {name: getattr(args, name) for name in expected} == expected


def test_run_takes_flags_anywhere(env: dict[str, str], model: str) -> None:
    after = local(env, "run", model, "--keepalive", "10m", "--think=false", "--hidethinking", "Name a color.")
    before = cli(env, "run", "--verbose", "--keepalive", "10m", model, "--local", "Name", "a", "color.")
    assert after.returncode == 0 and before.returncode == 0, after.stderr + before.stderr
    assert after.stdout.strip() and after.stdout == before.stdout  # greedy: the same answer to the same prompt
    assert "eval count:" in before.stderr
    # --think takes no value unless written --think=LEVEL: the prompt after it reaches the model,
    # which (SmolLM2 does not think) refuses the request rather than the parser refusing "Hi".
    refused = local(env, "run", model, "--think", "Hi")
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
    result = local(env, "run", model, "-i", stdin=script + "\n")
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
        [str(LOCALLLM), "run", model, "--local"],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        close_fds=True,
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
    result = local(env, "run", model, "-i", stdin=script + "\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Created new model 'pirate'" in out
    assert "Usage:\n  /save <modelname>" in out
    assert "Couldn't find model 'no-such-model'" in out
    assert "Loading model 'pirate'\n>>> Hello!\n" in out  # the saved conversation, shown again
    assert "You are a pirate.\n" in out.split("Loading model 'pirate'", 1)[1]  # the saved model's system message
    assert "/load <model>" in result.stderr and "/save <model>" in result.stderr

    saved = local(env, "show", "pirate", "--modelfile").stdout
    assert "SYSTEM You are a pirate." in saved
    assert re.search(r"^PARAMETER seed 42$", saved, re.M) and re.search(r"^PARAMETER num_predict 12$", saved, re.M)
    assert "MESSAGE user Hello!" in saved and "MESSAGE assistant " in saved
    assert local(env, "rm", "pirate").returncode == 0


def test_embed(env: dict[str, str], minilm_gguf: Path) -> None:
    result = local(env, "embed", str(minilm_gguf), "--dimensions", "8", "The sky is blue.")
    assert result.returncode == 0, result.stderr
    vector = json.loads(result.stdout)
    assert len(vector) == 8 and all(isinstance(x, float) for x in vector)
    assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-4)  # normalised again after the cut
    same = local(env, "run", str(minilm_gguf), "The", "sky", "is", "blue.", "--dimensions", "8")
    assert same.returncode == 0 and json.loads(same.stdout) == pytest.approx(vector, abs=1e-5)

    long_text = "word " * 700  # from stdin, longer than MiniLM's 512-token context
    refused = local(env, "embed", str(minilm_gguf), "--no-truncate", stdin=long_text)
    assert refused.returncode == 1 and "context" in refused.stderr, refused.stderr


def test_push_fails_clearly(env: dict[str, str]) -> None:
    result = cli(env, "push", "smollm2")  # no server is asked
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("Error: cannot push 'smollm2': localllm does not push models to a registry")
    assert len(result.stderr.splitlines()) == 1


def test_cp_and_rm(env: dict[str, str], model: str) -> None:
    result = local(env, "cp", model, "other")
    assert result.returncode == 0 and result.stdout == "copied 'smollm2' to 'other'\n"
    assert "other:latest" in local(env, "list").stdout
    result = local(env, "rm", "other")
    assert result.returncode == 0 and result.stdout == "deleted 'other'\n"
    assert "other:latest" not in local(env, "list").stdout


def test_errors_are_one_line(env: dict[str, str], model: str) -> None:
    for args in (("show", "no-such-model"), ("rm", "no-such-model"), ("cp", "x", "y")):
        result = local(env, *args)
        assert result.returncode == 1, args
        assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "not found" in result.stderr
    missing = local(env, "create", "x", "-f", "/no/such/Modelfile")
    assert missing.returncode == 1 and missing.stderr.startswith("Error: ")
    for name in ("no-such-model", model):  # a fresh process has nothing loaded: nothing to stop
        stopped = local(env, "stop", name)
        assert stopped.returncode == 1 and stopped.stderr == f'Error: couldn\'t find model "{name}" to stop\n'


def test_pull_shows_progress(env: dict[str, str]) -> None:
    with OCIRegistry() as registry:
        registry.add_model("library/tiny", "latest", tiny_gguf(seed=5, rows=800))
        result = local(env, "pull", f"{registry.host}/library/tiny")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "pulling manifest" and lines[-1] == "success"
    assert any(re.match(r"pulling [0-9a-f]{12}: 100% ▕█+▏ \d+ KB$", line) for line in lines), lines
    assert "verifying sha256 digest" in lines and "writing manifest" in lines
    assert f"{registry.host}/library/tiny:latest" in local(env, "list").stdout
    assert local(env, "rm", f"{registry.host}/library/tiny").returncode == 0


@pytest.mark.parametrize(
    ("setting", "url"),
    [
        ("example.com", "http://example.com:11434"),
        ("example.com:8080", "http://example.com:8080"),
        (":8080", "http://127.0.0.1:8080"),
        ("[::1]:9000", "http://[::1]:9000"),
        ("http://example.com", "http://example.com:80"),
        ("https://example.com/ollama/", "https://example.com:443/ollama"),
    ],
)
def test_host_settings_read_as_ollama_reads_them(setting: str, url: str) -> None:
    assert server_url(setting) == url


def test_a_bad_host_setting_is_an_error(env: dict[str, str]) -> None:
    result = cli({**env, "LOCALLLM_HOST": "127.0.0.1:http"}, "list")
    assert result.returncode == 1
    assert result.stderr == "Error: invalid LOCALLLM_HOST '127.0.0.1:http': 'http' is not a port number\n"


# --------------------------------------------------------------------------- through a server


@pytest.fixture(scope="module")
def server(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`localllm serve` on a free loopback port, with a store of its own; its host:port."""
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    server_env = {**env, "LOCALLLM_HOME": str(tmp_path_factory.mktemp("server-home"))}
    del server_env["LOCALLLM_HOST"]
    process = subprocess.Popen(
        [str(LOCALLLM), "serve", "--port", str(port)],
        env=server_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    listening = threading.Event()

    def read_log() -> None:  # also keeps the pipe from filling up
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line)
            if "listening on" in line:
                listening.set()
        listening.set()  # it exited

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        assert listening.wait(120) and process.poll() is None, "".join(log)
        yield f"127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        reader.join(timeout=60)


@pytest.fixture(scope="module")
def served(env: dict[str, str], server: str) -> dict[str, str]:
    """The environment of commands that go through the server."""
    return {**env, "LOCALLLM_HOST": server}


@pytest.fixture(scope="module")
def served_model(served: dict[str, str], smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A model created through the server: the GGUF file goes up as a blob, the rest as fields of the request."""
    folder = tmp_path_factory.mktemp("served-modelfile")
    (folder / "model.gguf").symlink_to(smollm2_path)
    (folder / "Modelfile").write_text(
        "FROM ./model.gguf\nPARAMETER temperature 0\nPARAMETER num_predict 12\nPARAMETER num_ctx 1024\n"
        "PARAMETER num_thread 1\nPARAMETER stop <|im_end|>\nSYSTEM You are served.\nLICENSE served-license\n"
        "MESSAGE user Hi\nMESSAGE assistant Hello from the server.\n"
    )
    result = cli(served, "create", "served", "-f", str(folder / "Modelfile"))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "gathering model components" and lines[-1] == "success", lines
    assert any(re.match(r"copying file: 100% ▕█+▏ 98 MB$", line) for line in lines), lines  # the upload
    return "served"


def test_the_server_has_its_own_store(
    env: dict[str, str], served: dict[str, str], model: str, served_model: str
) -> None:
    def names(listed: subprocess.CompletedProcess[str]) -> list[str]:
        assert listed.returncode == 0, listed.stderr
        return [row.split()[0] for row in listed.stdout.splitlines()[1:]]

    listed = cli(served, "list")
    assert "served:latest" in names(listed) and model + ":latest" not in names(listed)
    assert re.search(r"^served:latest\s{4,}[0-9a-f]{12}\s{4,}98 MB\s{4,}", listed.stdout, re.M)
    assert names(cli(served, "ls", "ser")) == ["served:latest"]
    here = names(local(env, "list"))
    assert model + ":latest" in here and "served:latest" not in here
    assert names(cli(served, "list", "--local")) == here  # --local wins over the host

    missing = cli(served, "show", model)
    assert missing.returncode == 1 and "not found" in missing.stderr, missing.stderr


def test_version_with_a_server(served: dict[str, str], server: str) -> None:
    """The server answers Ollama's version to its clients; `--version` still names localllm's own."""
    from localllm.http.ollama_api import OLLAMA_API_VERSION

    assert httpx.get(f"http://{server}/api/version").json() == {"version": OLLAMA_API_VERSION}
    result = cli(served, "--version")
    assert result.returncode == 0 and result.stdout == f"localllm version is {localllm.__version__}\n", result.stderr


def test_show_through_a_server(served: dict[str, str], served_model: str) -> None:
    result = cli(served, "show", served_model)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("  Model\n")
    assert re.search(r"^    architecture\s+llama$", result.stdout, re.M)
    assert re.search(r"^    quantization\s+Q4_1$", result.stdout, re.M)
    assert "  Capabilities\n    completion" in result.stdout
    assert "  System\n    You are served." in result.stdout
    assert "general.architecture" not in result.stdout
    verbose = cli(served, "show", served_model, "-v").stdout
    assert re.search(r"^    general\.architecture\s+llama$", verbose, re.M)
    assert re.search(r"^  Tensors\n    token_embd\.weight\s+Q8_0\s+\[576 49152\]$", verbose, re.M)
    assert "Tensors" not in result.stdout

    assert cli(served, "show", served_model, "--system").stdout == "You are served."
    assert cli(served, "show", served_model, "--license").stdout == "served-license\n"
    assert "im_start" in cli(served, "show", served_model, "--template").stdout
    parameters = cli(served, "show", served_model, "--parameters").stdout
    assert re.search(r"^num_predict\s+12$", parameters, re.M) and re.search(
        r'^stop\s+"<\|im_end\|>"$', parameters, re.M
    )
    modelfile = cli(served, "show", served_model, "--modelfile").stdout
    assert "MESSAGE user Hi" in modelfile and "MESSAGE assistant Hello from the server." in modelfile


def test_create_from_a_model_through_a_server(served: dict[str, str], served_model: str, tmp_path: Path) -> None:
    """A FROM naming a model stays a name, found in the server's store; an ADAPTER file goes up as a blob."""
    write_lora(tmp_path / "zero.gguf", b_scale=0.0)
    (tmp_path / "Modelfile").write_text(f"FROM {served_model}\nADAPTER ./zero.gguf\nSYSTEM You are terse.\n")
    result = cli(served, "create", "terse", "-f", str(tmp_path / "Modelfile"))
    assert result.returncode == 0, result.stderr
    assert cli(served, "show", "terse", "--system").stdout == "You are terse."
    assert re.search(r"^ADAPTER ", cli(served, "show", "terse", "--modelfile").stdout, re.M)
    assert cli(served, "rm", "terse").returncode == 0

    (tmp_path / "Modelfile").write_text("FROM no-such-model\n")
    refused = cli(served, "create", "other", "-f", str(tmp_path / "Modelfile"))
    assert refused.returncode == 1 and "no-such-model" in refused.stderr, refused.stderr


def test_create_from_a_model_folder_through_a_server(served: dict[str, str], minilm_dir: Path, tmp_path: Path) -> None:
    """A FROM naming a Hugging Face folder uploads its files under their names (sub-folders too), to convert there."""
    (tmp_path / "Modelfile").write_text(f"FROM {minilm_dir}\n")
    result = cli(served, "create", "minilm", "-f", str(tmp_path / "Modelfile"))
    assert result.returncode == 0, result.stderr
    shown = cli(served, "show", "minilm")
    assert "  Capabilities\n    embedding" in shown.stdout, shown.stdout
    assert cli(served, "rm", "minilm").returncode == 0


def test_cp_and_rm_through_a_server(env: dict[str, str], served: dict[str, str], served_model: str) -> None:
    result = cli(served, "cp", served_model, "copy")
    assert result.returncode == 0 and result.stdout == "copied 'served' to 'copy'\n", result.stderr
    assert "copy:latest" in cli(served, "list").stdout and "copy:latest" not in local(env, "list").stdout
    result = cli(served, "rm", "copy")
    assert result.returncode == 0 and result.stdout == "deleted 'copy'\n"
    assert "copy:latest" not in cli(served, "list").stdout
    for args in (("rm", "copy"), ("cp", "no-such-model", "x")):
        failed = cli(served, *args)
        assert failed.returncode == 1 and failed.stderr.startswith("Error: ") and "not found" in failed.stderr


def test_pull_through_a_server(env: dict[str, str], served: dict[str, str]) -> None:
    with OCIRegistry() as registry:
        registry.add_model("library/tiny", "latest", tiny_gguf(seed=6, rows=800))
        result = cli(served, "pull", f"{registry.host}/library/tiny")
        missing = cli(served, "pull", f"{registry.host}/library/missing")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "pulling manifest" and lines[-1] == "success"
    assert any(re.match(r"pulling [0-9a-f]{12}: 100% ▕█+▏ \d+ KB$", line) for line in lines), lines
    name = f"{registry.host}/library/tiny:latest"
    assert name in cli(served, "list").stdout and name not in local(env, "list").stdout
    assert cli(served, "rm", name).returncode == 0

    assert missing.returncode == 1, missing.stderr
    assert missing.stderr.splitlines()[-1].startswith("Error: ")


def test_ps_and_stop_through_a_server(served: dict[str, str], served_model: str) -> None:
    header = ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    assert cli(served, "ps").stdout.split() == header
    stopped = cli(served, "stop", served_model)  # known, but not loaded
    assert stopped.returncode == 1 and stopped.stderr == f'Error: couldn\'t find model "{served_model}" to stop\n'

    assert cli(served, "run", served_model, "--keepalive", "10m", "Hi").returncode == 0
    running = cli(served, "ps")
    assert running.returncode == 0, running.stderr
    row = running.stdout.splitlines()[1]
    assert re.match(r"served:latest\s+[0-9a-f]{12}\s+\d+ MB\s+100% CPU\s+1024\s+(9|10) minutes from now$", row), row
    result = cli(served, "stop", served_model)
    assert result.returncode == 0 and result.stdout == result.stderr == "", result.stderr
    assert cli(served, "ps").stdout.split() == header


def test_run_through_a_server(served: dict[str, str], server: str, served_model: str) -> None:
    """With a server at LOCALLLM_HOST (or OLLAMA_HOST), run asks it: --keepalive keeps the model warm there."""
    result = cli(served, "run", served_model, "--keepalive", "10m", "Name a color.")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    (loaded,) = httpx.get(f"http://{server}/api/ps").json()["models"]
    assert loaded["name"] == "served:latest"
    expires = parse_time(loaded["expires_at"])
    assert expires is not None
    assert 9 * 60 < (expires - datetime.datetime.now(datetime.timezone.utc)).total_seconds() <= 10 * 60

    ollama_env = {name: value for name, value in served.items() if name != "LOCALLLM_HOST"}
    ollama_env["OLLAMA_HOST"] = f"http://{server}"
    script = "Hello!\n/save from-server\n/load from-server\n/show system\n/load no-such-model\n/bye\n"
    chat = cli(ollama_env, "run", served_model, "-i", stdin=script)
    assert chat.returncode == 0 and "Created new model 'from-server'" in chat.stdout, chat.stderr
    assert "Loading model 'from-server'\n>>> Hi\nHello from the server.\n\n>>> Hello!\n" in chat.stdout
    assert "You are served.\n" in chat.stdout.split("Loading model 'from-server'", 1)[1]
    assert "Couldn't find model 'no-such-model'" in chat.stdout
    shown = httpx.post(f"http://{server}/api/show", json={"model": "from-server"}).json()
    assert [m["role"] for m in shown["messages"]] == ["user", "assistant", "user", "assistant"]
    assert cli(served, "rm", "from-server").returncode == 0


def test_run_pulls_a_missing_model_first(served: dict[str, str], smollm2_path: Path) -> None:
    """As `ollama run`: a model not in the store is pulled, with pull's progress, then run, here or by a server."""
    from localllm.registry.store import MEDIA_PARAMS

    params = {"temperature": 0, "num_predict": 4, "num_ctx": 1024, "num_thread": 1, "stop": ["<|im_end|>"]}
    with OCIRegistry() as registry:
        registry.add_model(
            "library/smol", "latest", smollm2_path.read_bytes(), extra=[(MEDIA_PARAMS, json.dumps(params).encode())]
        )
        name = f"{registry.host}/library/smol:latest"
        for where in (["--local"], []):  # in this process, then through the server
            result = cli(served, "run", name, "--insecure", "Hi", *where)
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip()  # the model's answer
            lines = result.stderr.splitlines()
            assert lines[0] == "pulling manifest" and "success" in lines, lines
            assert any(re.match(r"pulling [0-9a-f]{12}: 100% ▕█+▏ 98 MB$", line) for line in lines), lines
            assert name in cli(served, "list", *where).stdout
            again = cli(served, "run", name, "--insecure", "Hi", *where)
            assert again.returncode == 0 and again.stdout == result.stdout, again.stderr  # greedy: the same answer
            assert "pulling manifest" not in again.stderr  # stored now
            assert cli(served, "rm", name, *where).returncode == 0

        missing = cli(served, "run", f"{registry.host}/library/missing", "--insecure", "hi", "--local")
        assert missing.returncode == 1 and "not found" in missing.stderr.splitlines()[-1], missing.stderr
        through_server = cli(served, "run", f"{registry.host}/library/missing", "--insecure", "hi")
        assert through_server.returncode == 1 and through_server.stderr.splitlines()[-1].startswith("Error: ")
    path = cli(served, "run", "./no-such-file.gguf", "hi", "--local")  # a path is not pulled
    assert path.returncode == 1 and "pulling" not in path.stderr and path.stderr.startswith("Error: ")


# --------------------------------------------------------------------------- when the server does not answer


@pytest.mark.parametrize(
    "args",
    [
        ["list"],
        ["ps"],
        ["show", "m"],
        ["stop", "m"],
        ["rm", "m"],
        ["cp", "m", "n"],
        ["pull", "m"],
        ["create", "m", "-f", "Modelfile"],
        ["run", "m", "hi"],
        ["embed", "m", "hi"],
    ],
)
def test_a_host_that_refuses_is_an_error(
    env: dict[str, str], refusing_host: str, args: list[str], tmp_path: Path
) -> None:
    """Never a quiet fall back to this process: the command fails, and says how to get one or the other."""
    (tmp_path / "Modelfile").write_text("FROM m\n")
    result = cli(env, *[str(tmp_path / word) if word == "Modelfile" else word for word in args], timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == not_connecting(refusing_host)


def test_ollama_host_is_the_fallback_setting(env: dict[str, str], refusing_host: str) -> None:
    ollama_env = {name: value for name, value in env.items() if name != "LOCALLLM_HOST"}
    ollama_env["OLLAMA_HOST"] = refusing_host
    result = cli(ollama_env, "list", timeout=60)
    assert result.returncode == 1 and result.stderr == not_connecting(refusing_host)
    assert cli(ollama_env, "list", "--local").returncode == 0


def test_a_host_that_never_answers_is_an_error(env: dict[str, str]) -> None:
    """A server that takes the connection but says nothing: the command gives up after a few seconds."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes connections; nothing ever reads or answers them
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        result = cli({**env, "LOCALLLM_HOST": host}, "ps", timeout=60)
    assert result.returncode == 1 and result.stderr == not_connecting(host)


def test_the_default_port(
    env: dict[str, str],
    home: Path,
    server: str,
    served_model: str,
    refusing_host: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With no host set, a server answering on the default port is used; with none, the command runs here."""
    from localllm.cli import main, remote

    monkeypatch.delenv("LOCALLLM_HOST", raising=False)
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    monkeypatch.setenv("LOCALLLM_HOME", str(home))
    monkeypatch.setattr(remote, "DEFAULT_PORT", int(server.rsplit(":", 1)[1]))
    assert main(["list"]) == 0
    assert "served:latest" in capsys.readouterr().out

    monkeypatch.setattr(remote, "DEFAULT_PORT", int(refusing_host.rsplit(":", 1)[1]))
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "NAME" in out and "served:latest" not in out


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
