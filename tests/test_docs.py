"""The documentation works: every Python snippet runs as written, and every relative link resolves.

Each ```python block of README.md, CONTRIBUTING.md and docs/*.md runs on its own, with top-level
`await` allowed (as in a notebook), in a fresh LOCALLLM_HOME and a working folder that holds the
test models under the names the docs use. A block that cannot run offline says so with an HTML
comment `<!-- not run: why -->` on the line before its fence.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import io
import linecache
import re
import unicodedata
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image

import localllm
import localllm.client

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*\S.*-->\s*$")
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")

# The file names the snippets use, and the test models they stand for.
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_FOLDER = "all-MiniLM-L6-v2"
PROJECTOR_FILE = "mmproj-SmolLM2-test.gguf"  # the tests' tiny random-weight projector, paired with SmolLM2
PICTURE_FILE = "picture.png"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    not_run: bool


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence, language = opening[1], opening[2].lower()
        previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not re.match(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[end]):
            body.append(lines[end])
            end += 1
        blocks.append(Block(path, index + 1, language, "\n".join(body) + "\n", bool(NOT_RUN.match(previous))))
        index = end + 1
    return blocks


def python_blocks() -> list[Block]:
    return [block for path in DOCS for block in fenced_blocks(path) if block.language in ("python", "py")]


def runnable_python_blocks() -> list[pytest.ParameterSet]:
    """Each runnable snippet, named by its file, its number among the file's Python blocks and its line."""
    params = []
    for path in DOCS:
        snippets = [block for block in fenced_blocks(path) if block.language in ("python", "py")]
        for number, block in enumerate(snippets, 1):
            if not block.not_run:
                params.append(pytest.param(block, id=f"{path.relative_to(ROOT)}#{number}(line {block.line})"))
    return params


def test_snippets_are_found_and_few_are_left_unrun() -> None:
    not_run = [f"{block.path.name}:{block.line}" for block in python_blocks() if block.not_run]
    assert len(runnable_python_blocks()) >= 10
    assert len(not_run) <= 4, f"keep snippets marked <!-- not run --> rare: {not_run}"


def test_no_file_refers_to_a_missing_design_page() -> None:
    for path in DOCS:
        assert "DESIGN.md" not in path.read_text(encoding="utf-8"), f"{path.name} refers to DESIGN.md"


@pytest.fixture
def snippet_folder(
    tmp_path: Path, smollm2_path: Path, minilm_dir: Path, projector_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """A working folder holding the test models under the docs' names (and a picture), and an empty
    LOCALLLM_HOME."""
    work = tmp_path / "work"
    work.mkdir()
    (work / SMOLLM2_FILE).symlink_to(smollm2_path)
    (work / MINILM_FOLDER).symlink_to(minilm_dir, target_is_directory=True)
    (work / PROJECTOR_FILE).symlink_to(projector_path)
    Image.new("RGB", (64, 48), "teal").save(work / PICTURE_FILE)
    home = tmp_path / "home"
    monkeypatch.setenv("LOCALLLM_HOME", str(home))
    for name in ("LOCALLLM_MODELS", "LOCALLLM_HOST", "OLLAMA_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(work)
    # A snippet may use `smollm2` before (or without) creating it, as a reader who ran the one before would.
    with localllm.Client(home) as client:
        client.create("smollm2", from_=SMOLLM2_FILE)
    yield work
    _close_default_client()


def _close_default_client() -> None:
    """The module-level calls keep a default Client on the home of the moment; the next snippet gets a new one."""
    with localllm.client._default_lock:
        default, localllm.client._default = localllm.client._default, None
    if default is not None:
        default.close()


def run_snippet(code: str, filename: str) -> str:
    """Run a snippet as a notebook cell would (top-level await allowed) and return what it printed."""
    compiled = compile(code, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)  # lines in tracebacks
    namespace: dict[str, object] = {"__name__": "__main__", "__file__": filename}

    async def run_cell(cell: Coroutine[object, object, object]) -> None:
        try:
            await cell
        finally:  # what the cell left open is closed on its own event loop
            for value in list(namespace.values()):
                if isinstance(value, localllm.Engine):
                    await value.aclose()

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            cell = eval(compiled, namespace)
            if inspect.iscoroutine(cell):
                asyncio.run(run_cell(cell))
    finally:
        for value in list(namespace.values()):
            if isinstance(value, localllm.Client):
                value.close()
        namespace.clear()
    return printed.getvalue()


@pytest.mark.parametrize("block", runnable_python_blocks())
def test_python_snippet_runs(block: Block, snippet_folder: Path) -> None:
    printed = run_snippet(block.code, f"{block.path.relative_to(ROOT)}:{block.line}")
    assert printed.strip(), "the snippet printed nothing: it shows the reader nothing either"


# -- links ---------------------------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    kept = "".join(ch for ch in text.lower() if ch in " -_" or unicodedata.category(ch)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors: set[str] = set()
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        heading = HEADING.match(line)
        if heading is None or in_fence:
            continue
        base = github_anchor(heading[2])
        count = seen.get(base, 0)
        seen[base] = count + 1
        anchors.add(base if count == 0 else f"{base}-{count}")
    return anchors


def prose_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The lines outside fenced blocks, with inline code removed (links there are not links)."""
    in_fence = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield number, re.sub(r"(`+)(?:(?!\1).)+?\1", "", line)


def relative_links() -> Iterator[pytest.ParameterSet]:
    for path in DOCS:
        for number, line in prose_lines(path):
            for match in LINK.finditer(line):
                target = match[1] or match[2]
                if urlsplit(target).scheme or target.startswith("//"):
                    continue
                yield pytest.param(path, target, id=f"{path.relative_to(ROOT)}:{number}:{target}")


@pytest.mark.parametrize(("source", "target"), list(relative_links()))
def test_relative_link_resolves(source: Path, target: str) -> None:
    parts = urlsplit(target)
    destination = (source.parent / unquote(parts.path)).resolve() if parts.path else source
    assert destination.exists(), f"{target} does not exist"
    if parts.fragment:
        assert destination.suffix == ".md", f"{target}: anchors are checked in Markdown files only"
        assert parts.fragment in anchors_of(destination), f"{destination.name} has no heading #{parts.fragment}"


def test_links_are_found() -> None:
    assert len(list(relative_links())) >= 20


def test_referenced_example_scripts_exist() -> None:
    """Every `examples/...` file the docs name, in a link or not, is in the repository."""
    for path in DOCS:
        for name in re.findall(r"examples/[\w./-]+\.(?:py|ipynb)", path.read_text(encoding="utf-8")):
            assert (ROOT / name).is_file(), f"{path.name} names {name}, which does not exist"
