"""What memory there is to load models into: GPUs (through NVML) and system RAM.

`discover()` takes a snapshot of the machine. Everything that plans memory takes a
`DeviceInventory` value (or a callable returning a fresh one), so tests and users who want
to pin devices can hand in their own instead of probing the hardware.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

import attrs
from attrs import validators as v

logger = logging.getLogger(__name__)

_non_negative = [v.instance_of(int), v.ge(0)]


def _free_within_total(instance: Any, attribute: attrs.Attribute[int], value: int) -> None:
    if value > instance.total_memory:
        raise ValueError(f"{attribute.name} ({value}) exceeds total_memory ({instance.total_memory})")


@attrs.frozen
class GpuDevice:
    """One GPU as llama.cpp numbers it (`index` is what main_gpu and tensor_split refer to)."""

    index: int = attrs.field(validator=_non_negative)
    name: str = attrs.field(validator=v.instance_of(str))
    total_memory: int = attrs.field(validator=_non_negative)
    free_memory: int = attrs.field(validator=[*_non_negative, _free_within_total])
    id: str | None = attrs.field(default=None, validator=v.optional(v.instance_of(str)))
    library: str = attrs.field(default="cuda", validator=v.instance_of(str))


@attrs.frozen
class SystemMemory:
    """Host RAM in bytes; `free` is what can be allocated without swapping (MemAvailable)."""

    total: int = attrs.field(validator=_non_negative)
    free: int = attrs.field(validator=_non_negative)
    free_swap: int = attrs.field(default=0, validator=_non_negative)

    @free.validator
    def _check_free(self, attribute: attrs.Attribute[int], value: int) -> None:
        if value > self.total:
            raise ValueError(f"free ({value}) exceeds total ({self.total})")


def _gpu_tuple(value: Iterable[GpuDevice]) -> tuple[GpuDevice, ...]:
    return tuple(value)


def _check_gpus(instance: Any, attribute: attrs.Attribute[Any], value: tuple[GpuDevice, ...]) -> None:
    indexes = [gpu.index for gpu in value]
    if len(set(indexes)) != len(indexes):
        raise ValueError(f"GPU indexes must be unique, got {indexes}")


@attrs.frozen
class DeviceInventory:
    """The GPUs llama.cpp can offload to and the host's memory, at one moment."""

    gpus: tuple[GpuDevice, ...] = attrs.field(
        converter=_gpu_tuple,
        validator=[v.deep_iterable(v.instance_of(GpuDevice), v.instance_of(tuple)), _check_gpus],
    )
    system: SystemMemory = attrs.field(validator=v.instance_of(SystemMemory))

    def gpu(self, index: int) -> GpuDevice | None:
        """The GPU with llama.cpp index `index`, or None."""
        return next((gpu for gpu in self.gpus if gpu.index == index), None)

    def with_all_free(self) -> DeviceInventory:
        """The same machine with every byte free: what could be had if every loaded model were unloaded."""
        return DeviceInventory(
            gpus=tuple(attrs.evolve(gpu, free_memory=gpu.total_memory) for gpu in self.gpus),
            system=attrs.evolve(self.system, free=self.system.total),
        )


InventorySource: TypeAlias = DeviceInventory | Callable[[], DeviceInventory]
"""What planners accept: a fixed inventory, or a callable that takes a fresh snapshot."""


def resolve_inventory(source: InventorySource | None = None) -> DeviceInventory:
    """A `DeviceInventory` from an inventory, a callable returning one, or None (discover the machine)."""
    if source is None:
        return discover()
    if isinstance(source, DeviceInventory):
        return source
    inventory = source()
    if not isinstance(inventory, DeviceInventory):
        raise TypeError(f"the device inventory callable returned {type(inventory).__name__}, not DeviceInventory")
    return inventory


def cpu_only(system: SystemMemory | None = None) -> DeviceInventory:
    """An inventory without GPUs: the host's memory (measured now unless given)."""
    return DeviceInventory(gpus=(), system=system if system is not None else system_memory())


def discover(can_offload: Callable[[], bool] | None = None) -> DeviceInventory:
    """Probe the machine: NVIDIA GPUs llama.cpp can use, and system RAM. Never raises for missing hardware.

    `can_offload` says whether llama.cpp can use a GPU at all (default: ask the installed build).
    """
    gpus = nvidia_gpus() if (can_offload or _llama_cpp_can_offload)() else ()
    return DeviceInventory(gpus=gpus, system=system_memory())


# -- system memory ----------------------------------------------------------------------------------------------


def system_memory(meminfo_path: str = "/proc/meminfo") -> SystemMemory:
    """Total and available host RAM (Linux /proc/meminfo, else sysconf)."""
    parsed = _read_meminfo(meminfo_path)
    if parsed is not None:
        return parsed
    return _sysconf_memory()


def _read_meminfo(path: str) -> SystemMemory | None:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        try:
            amount = int(parts[0])
        except ValueError:
            continue
        scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
        fields[key.strip()] = amount * scale
    total = fields.get("MemTotal")
    if not total:
        return None
    if "MemAvailable" in fields:
        free = fields["MemAvailable"]
    else:  # kernels before 3.14
        free = fields.get("MemFree", 0) + fields.get("Buffers", 0) + fields.get("Cached", 0)
    return SystemMemory(total=total, free=min(free, total), free_swap=fields.get("SwapFree", 0))


def _sysconf_memory() -> SystemMemory:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        logger.warning("cannot read the amount of system memory; assuming none is available")
        return SystemMemory(total=0, free=0)
    try:
        free = page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        free = total
    return SystemMemory(total=max(total, 0), free=max(min(free, total), 0))


# -- GPUs -------------------------------------------------------------------------------------------------------


def _llama_cpp_can_offload() -> bool:
    """Whether the installed llama.cpp build has a GPU backend (False when llama_cpp is missing)."""
    try:
        from ..runner.llama import supports_gpu_offload
    except (ImportError, OSError):
        return False
    return supports_gpu_offload()


def _visible_selectors() -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list of ordinals / UUID prefixes, or None when unset."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def nvidia_gpus() -> tuple[GpuDevice, ...]:
    """NVIDIA GPUs from NVML, numbered as CUDA will number them. Empty on any NVML failure."""
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError, or a missing driver library surfacing as OSError
        logger.debug("NVML is not available: %s", exc)
        return ()
    try:
        found = []
        for nvml_index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = _text(pynvml.nvmlDeviceGetName(handle))
            try:
                uuid: str | None = _text(pynvml.nvmlDeviceGetUUID(handle))
            except pynvml.NVMLError:
                uuid = None
            total = int(memory.total)
            found.append((nvml_index, name, total, min(int(memory.free), total), uuid))
    except Exception as exc:
        logger.warning("NVML failed while listing GPUs; planning for CPU only: %s", exc)
        return ()
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return _number_visible(found, _visible_selectors())


def _number_visible(
    found: list[tuple[int, str, int, int, str | None]], selectors: list[str] | None
) -> tuple[GpuDevice, ...]:
    """Apply CUDA_VISIBLE_DEVICES: keep the listed devices, in its order, renumbered from 0."""
    if selectors is None:
        chosen = found
    else:
        chosen = []
        for selector in selectors:
            match = None
            if selector.isdigit():
                match = next((entry for entry in found if entry[0] == int(selector)), None)
            else:
                match = next((entry for entry in found if entry[4] and entry[4].startswith(selector)), None)
            if match is None:
                break  # CUDA stops at the first invalid entry
            if match not in chosen:
                chosen.append(match)
    return tuple(
        GpuDevice(index=i, name=name, total_memory=total, free_memory=free, id=uuid)
        for i, (_nvml, name, total, free, uuid) in enumerate(chosen)
    )


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
