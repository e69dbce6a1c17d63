"""The example notebook, run cell by cell in a real Jupyter kernel, as a user runs it.

Beside the notebook's own cells, the test runs a few probe cells of its own in the same kernel: the
kernel's memory and threads after each run of the engine cell, and the slot after an interrupt.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anyio
import nbformat
import pytest
from nbclient import NotebookClient
from nbformat import NotebookNode

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "notebook.ipynb"

# Prints the kernel's resident memory (MiB) and how many runner threads it holds, as one JSON line.
MEMORY_PROBE = """
import json, threading
with open("/proc/self/status") as status:
    rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
ours = [t.name for t in threading.enumerate() if t.name.startswith("localllm-runner")]
print(json.dumps({"rss_mib": rss_kib / 1024, "threads": len(ours)}))
"""

# Waits (bounded) for the interrupted request to leave its slot, then prints what the runner holds.
SLOT_PROBE = """
import json, anyio
runner = (await engine.scheduler.running())[0].runner
with anyio.move_on_after(30):
    while runner.active_count or runner.pending_count:
        await anyio.sleep(0.01)
print(json.dumps({"active": runner.active_count, "pending": runner.pending_count}))
"""


def text_of(cell: NotebookNode) -> str:
    return "".join(
        output.get("text", "") + "".join(output.get("data", {}).get("text/plain", ""))
        for output in cell.get("outputs", [])
        if output.output_type in ("stream", "execute_result")
    )


def errors_of(cell: NotebookNode) -> list[str]:
    return [output.ename for output in cell.get("outputs", []) if output.output_type == "error"]


def cell_with(cells: list[NotebookNode], source: str) -> int:
    (index,) = [i for i, cell in enumerate(cells) if cell.cell_type == "code" and source in cell.source]
    return index


@pytest.fixture
def kernel_env(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The kernel inherits this process's environment: a home of its own, and no server to talk to."""
    monkeypatch.setenv("LOCALLLM_HOME", str(home))
    for name in ("LOCALLLM_HOST", "OLLAMA_HOST", "LOCALLLM_MODELS"):
        monkeypatch.delenv(name, raising=False)
    yield


def test_the_example_notebook_runs_reruns_and_survives_an_interrupt(
    kernel_env: None, smollm2_path: Path, tmp_path: Path
) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = list(nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell())  # where the probes run, after the notebook's own cells
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})

    async def probe(source: str) -> dict[str, float]:
        cell = nbformat.v4.new_code_cell(source)
        await client.async_execute_cell(cell, len(cells))
        return dict(json.loads(text_of(cell).strip().splitlines()[-1]))

    async def run_cell(index: int) -> NotebookNode:
        return await client.async_execute_cell(cells[index], index)

    async def interrupt_once_streaming(cell: NotebookNode) -> None:
        """Interrupt the kernel as soon as the cell has streamed some text, as a user pressing stop would."""
        with anyio.fail_after(300):
            while len(text_of(cell)) < 20:
                await anyio.sleep(0.05)
        await client.km.interrupt_kernel()

    async def main() -> None:
        async with client.async_setup_kernel():
            engine_cell = cell_with(cells, "engine = localllm.Engine(")
            for index in range(engine_cell):
                await run_cell(index)
            # Re-running the engine cell replaces the engine; the old one must not keep its model loaded.
            memory = []
            for _ in range(4):
                assert text_of(await run_cell(engine_cell)).strip()
                memory.append(await probe(MEMORY_PROBE))
            # A model left loaded would add its weights and cache (about 200 MiB) each time. From the second run
            # on, what remains is the allocator settling: within 10%.
            assert memory[-1]["rss_mib"] <= memory[1]["rss_mib"] * 1.10, memory
            assert [m["threads"] for m in memory] == [1, 1, 1, 1], memory  # one runner thread: the model once

            streaming = cell_with(cells, "async for chunk in engine.chat(")
            assert text_of(await run_cell(streaming)).strip()

            long_cell = cell_with(cells, 'engine.generate("smollm2", "Once upon a time"')
            async with anyio.create_task_group() as group:
                group.start_soon(interrupt_once_streaming, cells[long_cell])
                await run_cell(long_cell)
                group.cancel_scope.cancel()  # the cell ended before the interrupt: the assertion below says so
            # ipykernel cancels an awaiting cell's task on interrupt; a cell running plain code gets KeyboardInterrupt.
            assert errors_of(cells[long_cell]) in (["CancelledError"], ["KeyboardInterrupt"])
            assert await probe(SLOT_PROBE) == {"active": 0, "pending": 0}

            for index in range(long_cell + 1, len(cells)):
                cell = await run_cell(index)
                assert not errors_of(cell), cell.get("outputs")
            assert text_of(cells[-1]).strip()

    anyio.run(main, backend="asyncio")  # nbclient runs on asyncio
