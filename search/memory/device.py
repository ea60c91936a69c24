"""The device a trial runs on and how much memory it may use (``--memory-limit``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import psutil

from search.record.precision import device_type

__all__ = ["DeviceInfo", "device_info", "format_bytes", "parse_size"]

GIB = 1024**3
MIB = 1024**2

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": MIB,
    "mb": 1000**2,
    "mib": MIB,
    "g": GIB,
    "gb": 1000**3,
    "gib": GIB,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class DeviceInfo:
    """A device and the memory a trial may use on it.

    Args:
        name: Torch device name, e.g. ``cuda:0`` or ``cpu``.
        label: Human-readable, e.g. ``cuda:0 (NVIDIA H100 80GB HBM3, 79.1 GiB)``.
        total_bytes: The device's total memory, or the memory limit when it is smaller.
        free_bytes: Memory free now, capped by the limit.
    """

    name: str
    label: str
    total_bytes: int
    free_bytes: int

    @property
    def kind(self) -> str:
        """Device type without the index: ``cuda``, ``cpu``, ``mps``..."""
        return self.name.split(":")[0]

    @property
    def total_mb(self) -> float:
        """``total_bytes`` in MiB (what ``device_memory_mb`` records)."""
        return self.total_bytes / MIB


def parse_size(text: str) -> int:
    """Bytes in a size such as ``6GiB``, ``512MB``, ``2G``, ``1.5GiB`` or ``1048576``.

    Binary units (``KiB``, ``MiB``, ``GiB``, ``TiB``) and their one-letter forms (``K``, ``M``,
    ``G``, ``T``) are powers of 1024; ``KB``, ``MB``, ``GB``, ``TB`` are powers of 1000.

    Example:
        >>> parse_size("1.5GiB")
        1610612736
        >>> parse_size("512MB")
        512000000

    Args:
        text: The size; case-insensitive, spaces allowed between number and unit.

    Returns:
        The size in bytes (rounded down).

    Raises:
        ValueError: When ``text`` is not a positive size.
    """
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (try 6GiB, 512MB, 2G or a number of bytes)")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"a size must be positive, but got {text!r}")
    return size


def format_bytes(n: float) -> str:
    """``n`` bytes as GiB with one decimal (MiB below 1 GiB), e.g. ``79.1 GiB``."""
    if abs(n) >= GIB:
        return f"{n / GIB:.1f} GiB"
    return f"{n / MIB:.0f} MiB"


def _cuda_memory(index: int) -> tuple[str, int, int]:
    """(name, free, total) of a CUDA device, through NVML when present (no CUDA context)."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            return name, int(mem.free), int(mem.total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVML missing or CUDA_VISIBLE_DEVICES remapped: use torch
        import torch

        free, total = torch.cuda.mem_get_info(index)
        return torch.cuda.get_device_name(index), int(free), int(total)


def device_info(device: str, *, memory_limit: int | None = None) -> DeviceInfo:
    """Describe ``device`` and the memory a trial may use on it.

    On CUDA the free and total memory come from NVML when ``pynvml`` is installed (the worker
    then never holds a CUDA context of its own), else from ``torch.cuda.mem_get_info``. On CPU
    the total is the host's RAM and the free memory what ``psutil`` reports as available.

    Example:
        >>> info = device_info("cpu", memory_limit=parse_size("1GiB"))
        >>> info.total_bytes
        1073741824

    Args:
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available).
        memory_limit: Bytes a trial may use (``--memory-limit``); caps total and free.

    Returns:
        The device's description.
    """
    if memory_limit is not None and memory_limit <= 0:
        raise ValueError(f"memory_limit must be positive, but got {memory_limit=}.")
    if device == "auto":
        device = device_type(device)  # imports torch: the CLI parses --memory-limit before
    kind, _, idx = device.partition(":")
    if kind == "cuda":
        index = int(idx) if idx else 0
        name = f"cuda:{index}"
        model, free, total = _cuda_memory(index)
        what = model
    elif kind == "cpu":
        name = "cpu"
        vm = psutil.virtual_memory()
        free, total = int(vm.available), int(vm.total)
        what = ""
    else:
        raise ValueError(f"unknown device {device!r} (cpu, cuda, cuda:N or auto)")
    if memory_limit is not None:
        total, free = min(total, memory_limit), min(free, memory_limit)
    size = format_bytes(total)
    if memory_limit is not None and memory_limit <= total:
        size = f"limit {size}"
    label = f"{name} ({what}, {size})" if what else f"{name} ({size})"
    return DeviceInfo(name=name, label=label, total_bytes=total, free_bytes=free)
