"""What `nox -s installs` runs in a fresh virtual environment holding the package and one extra, nothing else.

Run as a script (not collected by pytest): ``python tests/install_check.py [http|ray]``. It checks what a
user of that install relies on: the package imports, the command runs, the extra's entry point works,
and the extras that are not installed fail with a message naming what to install. Exits non-zero on
any failure.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

LOCALLLM = Path(sys.executable).with_name("localllm")  # the console script of this environment
SERVE_DEADLINE_S = 120.0


def check(condition: bool, message: str) -> None:
    if not condition:
        sys.exit(f"install check failed: {message}")


def run_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LOCALLLM), *args], capture_output=True, text=True, timeout=120, check=False)


def check_core() -> None:
    import localllm

    check(isinstance(localllm.__version__, str), "localllm has no __version__")
    check("llama_cpp" not in sys.modules, "import localllm imported llama_cpp")
    help_text = run_command("--help")
    check(help_text.returncode == 0 and "serve" in help_text.stdout, f"localllm --help failed: {help_text}")
    version = run_command("--version")
    check(version.returncode == 0 and localllm.__version__ in version.stdout, f"localllm --version: {version}")
    import llama_cpp  # the engine's own dependency: compiled and importable

    check(callable(llama_cpp.llama_backend_init), "llama_cpp has no llama_backend_init")


def check_missing(module: str, extra: str) -> None:
    """An extra that is not installed fails with a message that says how to install it."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        check(f"localllm[{extra}]" in str(exc), f"import {module} failed without naming the extra: {exc}")
    else:
        sys.exit(f"install check failed: {module} imported without the [{extra}] extra")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_serve() -> None:
    """`localllm serve` starts and answers /api/version; Ctrl-C stops it."""
    port = free_port()
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "LOCALLLM_HOME": home}
        env.pop("LOCALLLM_HOST", None)
        env.pop("OLLAMA_HOST", None)
        server = subprocess.Popen(
            [str(LOCALLLM), "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + SERVE_DEADLINE_S
            while True:
                check(server.poll() is None, f"localllm serve exited with {server.returncode}: {server.stdout}")
                try:
                    reply = httpx.get(f"http://127.0.0.1:{port}/api/version", timeout=5)
                    break
                except httpx.TransportError:
                    check(time.monotonic() < deadline, f"localllm serve did not answer in {SERVE_DEADLINE_S} s")
                    time.sleep(0.2)
            check(reply.status_code == 200 and "version" in reply.json(), f"/api/version: {reply.text}")
        finally:
            server.send_signal(signal.SIGINT)
            try:
                output, _ = server.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                sys.exit("install check failed: localllm serve did not stop on SIGINT")
        check(server.returncode in (0, 130), f"localllm serve exited with {server.returncode}: {output}")


def main(extra: str) -> None:
    check_core()
    if extra == "http":
        check_serve()
    else:
        check_missing("localllm.http", "http")
        refused = run_command("serve", "--port", str(free_port()))
        check(refused.returncode == 1 and "localllm[http]" in refused.stderr, f"serve without [http]: {refused}")
    if extra == "ray":
        from localllm.ray import ClusterEngine

        check(callable(ClusterEngine), "localllm.ray has no ClusterEngine")
    else:
        check_missing("localllm.ray", "ray")
    print(f"install check passed: localllm{f'[{extra}]' if extra else ''}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
