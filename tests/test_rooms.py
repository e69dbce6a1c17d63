"""The rooms of the package and the rules between them (docs/design.md), checked on the source itself.

Imports are read with `ast`; imports under `if TYPE_CHECKING:` are types only and do not count.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

PACKAGE = Path(__file__).resolve().parent.parent / "localllm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _runtime_nodes(tree: ast.Module) -> Iterator[ast.AST]:
    """Every node, except what sits under `if TYPE_CHECKING:`."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str) -> set[str]:
    """The modules `name` imports at run time (localllm modules by their dotted names, others by top name)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
    return found


def test_import_localllm_does_not_import_llama_cpp() -> None:
    code = "import sys, localllm; assert 'llama_cpp' not in sys.modules, 'llama_cpp was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_only_the_llama_wrappers_call_llama_cpp() -> None:
    """The runners reach llama.cpp through the `Backend` protocol; quantizing calls it directly."""
    allowed = {"localllm.runner.llama", "localllm.runner.mtmd", "localllm.runner.quantize"}
    offenders = [
        name
        for name in MODULES
        if name not in allowed and any(imported.split(".")[0] == "llama_cpp" for imported in imports_of(name))
    ]
    assert offenders == []


@pytest.mark.parametrize(
    ("room", "forbidden"),
    [
        # Data flows one way: engine -> scheduler -> runner.
        (
            "localllm.runner",
            (
                "localllm.scheduler",
                "localllm.engine",
                "localllm.service",
                "localllm.registry",
                "localllm.http",
                "localllm.cli",
                "localllm.pipeline",
            ),
        ),
        (
            "localllm.scheduler",
            (
                "localllm.engine",
                "localllm.service",
                "localllm.registry",
                "localllm.http",
                "localllm.cli",
                "localllm.pipeline",
            ),
        ),
        # The registry knows nothing of runners; nothing below the engine sees the Engine.
        (
            "localllm.registry",
            (
                "localllm.runner",
                "localllm.scheduler",
                "localllm.engine",
                "localllm.service",
                "localllm.http",
                "localllm.cli",
            ),
        ),
        (
            "localllm.gguf",
            (
                "localllm.runner",
                "localllm.scheduler",
                "localllm.engine",
                "localllm.registry",
                "localllm.http",
                "localllm.cli",
            ),
        ),
        (
            "localllm.chat",
            (
                "localllm.runner",
                "localllm.scheduler",
                "localllm.engine",
                "localllm.registry",
                "localllm.http",
                "localllm.cli",
            ),
        ),
        ("localllm.service", ("localllm.engine", "localllm.http", "localllm.cli")),
        ("localllm.pipeline", ("localllm.engine", "localllm.http", "localllm.cli")),
        ("localllm.embeddings", ("localllm.engine", "localllm.http", "localllm.cli")),
    ],
)
def test_rooms_import_only_downstream(room: str, forbidden: tuple[str, ...]) -> None:
    crossings = sorted(
        f"{name} imports {imported}"
        for name in MODULES
        if name == room or name.startswith(room + ".")
        for imported in imports_of(name)
        if any(imported == f or imported.startswith(f + ".") for f in forbidden)
    )
    assert crossings == []


@pytest.mark.parametrize("room", ["localllm.http", "localllm.cli"])
def test_the_shim_and_the_cli_use_only_the_public_engine_api(room: str) -> None:
    """No private names of other objects, no reaching past the Engine into its registry or scheduler."""
    crossings = []
    for name, path in MODULES.items():
        if not (name == room or name.startswith(room + ".")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                owner = ast.unparse(node.value)
                private = node.attr.startswith("_") and not node.attr.startswith("__") and owner != "self"
                if private or node.attr in ("registry", "scheduler"):
                    crossings.append(f"{name}:{node.lineno} {owner}.{node.attr}")
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("localllm.") and not node.module.startswith(room):
                    crossings.append(f"{name}:{node.lineno} imports {node.module}")
    assert crossings == []


MAX_MODULE_LINES = 1000


def modules_over(limit: int) -> dict[str, int]:
    """The modules longer than `limit` lines, with their line counts."""
    counts = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    return {name: count for name, count in counts.items() if count > limit}


def test_no_module_is_over_a_thousand_lines() -> None:
    """Small modules with one job: a module that grows past the limit is split by what it does."""
    assert modules_over(MAX_MODULE_LINES) == {}


#: What the front doors may import of the package besides their own rooms: the public names (``localllm``) and
#: the modules that define them, the other front doors, and `files` (opening a file a user names).
PUBLIC_MODULES = (
    "localllm",
    "localllm.types",
    "localllm.errors",
    "localllm.options",
    "localllm.parsing",
    "localllm.request",
    "localllm.api",
    "localllm.files",
    "localllm.http",
    "localllm.cli",
    "localllm.ray",
)


@pytest.mark.parametrize("room", ["localllm.http", "localllm.cli"])
def test_the_shim_and_the_cli_import_no_internal_room(room: str) -> None:
    """Names, keep_alive, Modelfiles and the response types reach them through the public surface only."""
    crossings = sorted(
        f"{name} imports {imported}"
        for name in MODULES
        if name == room or name.startswith(room + ".")
        for imported in imports_of(name)
        if imported.split(".")[0] == "localllm"
        and not any(imported == public or imported.startswith(public + ".") for public in PUBLIC_MODULES[1:])
        and imported != "localllm"
    )
    assert crossings == []


def test_no_import_cycles() -> None:
    graph = {name: {i for i in imports_of(name) if i in MODULES and i != "localllm"} for name in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    assert cycles == []


def test_one_thread_to_loop_helper() -> None:
    """Only localllm/loop.py schedules calls into the event loop from other threads."""
    users = [
        name
        for name, path in MODULES.items()
        if name != "localllm.loop" and any(word in path.read_text() for word in ("run_sync_soon", "current_token()"))
    ]
    assert users == []
