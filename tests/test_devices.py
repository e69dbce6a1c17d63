"""Device discovery: the real machine, and NVML / llama_cpp stand-ins for the GPU paths."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import attrs
import pytest

from localllm.scheduler import devices
from localllm.scheduler.devices import (
    DeviceInventory,
    GpuDevice,
    SystemMemory,
    cpu_only,
    discover,
    nvidia_gpus,
    resolve_inventory,
    system_memory,
)

pytestmark = pytest.mark.fast

GiB = 1024**3


def test_discover_on_this_machine() -> None:
    inventory = discover()
    assert inventory.gpus == ()  # no GPU and no NVIDIA driver here; the llama_cpp build is CPU-only
    assert inventory.system.total > 0
    assert 0 < inventory.system.free <= inventory.system.total


def test_cpu_only() -> None:
    inventory = cpu_only()
    assert inventory.gpus == () and inventory.system.total > 0
    pinned = cpu_only(SystemMemory(total=8 * GiB, free=2 * GiB))
    assert pinned.system.free == 2 * GiB


def test_meminfo_parsing(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384000 kB\nMemFree:         1000000 kB\nMemAvailable:    8192000 kB\n")
    memory = system_memory(str(meminfo))
    assert memory == SystemMemory(total=16384000 * 1024, free=8192000 * 1024, free_swap=0)
    old_kernel = tmp_path / "old"
    old_kernel.write_text("MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 25 kB\nSwapFree: 10 kB\n")
    assert system_memory(str(old_kernel)) == SystemMemory(total=1024000, free=175 * 1024, free_swap=10 * 1024)


def test_sysconf_fallback(tmp_path: Path) -> None:
    memory = system_memory(str(tmp_path / "missing"))
    assert memory.total > 0 and 0 <= memory.free <= memory.total


def test_values_are_validated() -> None:
    with pytest.raises(ValueError):
        GpuDevice(index=0, name="x", total_memory=GiB, free_memory=2 * GiB)
    with pytest.raises(ValueError):
        SystemMemory(total=GiB, free=2 * GiB)
    with pytest.raises(ValueError):
        DeviceInventory(gpus=(GpuDevice(0, "a", GiB, GiB), GpuDevice(0, "b", GiB, GiB)), system=SystemMemory(GiB, GiB))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        GpuDevice(0, "a", GiB, GiB).free_memory = 0  # type: ignore[misc]


def test_resolve_inventory_accepts_values_and_callables() -> None:
    fixed = DeviceInventory(gpus=[GpuDevice(0, "a", 8 * GiB, 4 * GiB)], system=SystemMemory(GiB, GiB))
    assert fixed.gpus == (GpuDevice(0, "a", 8 * GiB, 4 * GiB),)
    assert resolve_inventory(fixed) is fixed
    assert resolve_inventory(lambda: fixed) is fixed
    with pytest.raises(TypeError):
        resolve_inventory(lambda: "nonsense")  # type: ignore[arg-type]
    freed = fixed.with_all_free()
    assert freed.gpus[0].free_memory == 8 * GiB and freed.system.free == GiB


# -- stand-ins for NVML and llama_cpp -----------------------------------------------------------------------------


class FakeNVMLError(Exception):
    pass


def fake_pynvml(cards: list[tuple[str, int, int, str]], *, fail_init: bool = False) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    state = {"initialised": False}

    def init() -> None:
        if fail_init:
            raise FakeNVMLError("NVML Shared Library Not Found")
        state["initialised"] = True

    def memory(handle: int) -> Any:
        _name, total, free, _uuid = cards[handle]
        return types.SimpleNamespace(total=total, free=free, used=total - free)

    module.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: state.update(initialised=False)  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(cards)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda h: cards[h][0].encode()  # type: ignore[attr-defined]  # old versions: bytes
    module.nvmlDeviceGetUUID = lambda h: cards[h][3]  # type: ignore[attr-defined]
    module.state = state  # type: ignore[attr-defined]
    return module


CARDS = [
    ("NVIDIA A", 24 * GiB, 20 * GiB, "GPU-aaaa-1111"),
    ("NVIDIA B", 16 * GiB, 3 * GiB, "GPU-bbbb-2222"),
]


def test_nvml_lists_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    module = fake_pynvml(CARDS)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus = nvidia_gpus()
    assert gpus == (
        GpuDevice(0, "NVIDIA A", 24 * GiB, 20 * GiB, id="GPU-aaaa-1111"),
        GpuDevice(1, "NVIDIA B", 16 * GiB, 3 * GiB, id="GPU-bbbb-2222"),
    )
    assert module.state["initialised"] is False  # shut down again


def test_cuda_visible_devices_renumbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(CARDS))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [(g.index, g.name) for g in nvidia_gpus()] == [(0, "NVIDIA B")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,GPU-aaaa")
    assert [(g.index, g.name) for g in nvidia_gpus()] == [(0, "NVIDIA B"), (1, "NVIDIA A")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert nvidia_gpus() == ()


def test_nvml_failure_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(CARDS, fail_init=True))
    assert nvidia_gpus() == ()
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert nvidia_gpus() == ()


def test_discover_needs_a_gpu_build_of_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(CARDS))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert len(discover(can_offload=lambda: True).gpus) == 2
    assert discover(can_offload=lambda: False).gpus == ()
    assert discover().gpus == ()  # the installed build here is CPU-only
    assert devices.discover().system.total > 0
