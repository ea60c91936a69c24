"""The device and precision rules of a trial, in one place.

The CLI, the device description, the isolated trial process, the training loop and the memory
estimate all ask the same questions: which device does ``auto`` mean, may this CPU compute in
bf16, which autocast dtype does a run use. They ask here. torch is imported inside the
functions, so that importing this module (the CLI parsing options, the estimate in the
preflight) stays light.

Example:
    >>> device_type("cpu"), device_type("cuda:1")
    ('cpu', 'cuda')
    >>> uses_autocast("cpu", amp=True, hidden=64)  # too narrow to gain from bf16 on a CPU
    False
    >>> uses_autocast("cuda", amp=True, hidden=64), uses_autocast("cuda", amp=False, hidden=64)
    (True, False)
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from contextlib import nullcontext
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "CPU_BF16_MIN_HIDDEN",
    "CPU_BF16_MIN_HIDDEN_AMX",
    "autocast",
    "autocast_dtype",
    "cpu_bf16_min_hidden",
    "cpu_has_amx",
    "cpu_has_native_bf16",
    "device_type",
    "precision_name",
    "resolve_device",
    "uses_autocast",
]

# Smallest hidden size whose training step gains from bf16 autocast on a CPU (padding-free step,
# L2 replicas, 5 paired rounds). AVX512-BF16 without AMX: bf16/fp32 0.72x at H64, 1.01x H128,
# 1.33x H256; AMX: 1.00x at H64, 1.42x H128, 2.04x H256 (BENCHMARKS.md, "CPU precision").
CPU_BF16_MIN_HIDDEN = 256
CPU_BF16_MIN_HIDDEN_AMX = 128


def device_type(name: str) -> str:
    """The kind of device ``name`` means: ``cuda``, ``cpu``... (``auto``: CUDA when available)."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name.split(":")[0]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as ``torch.device``.

    Raises:
        ValueError: A CUDA device was asked for and CUDA is not available.
    """
    import torch

    device = torch.device(device_type(name) if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available.")
    return device


@cache
def _linux_cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags as Linux lists them (``/proc/cpuinfo``); None elsewhere.

    The kernel lists ``amx_tile`` only where it also enables the AMX state, so these flags
    answer what torch's own checks answer, without importing torch (2 s of CPU in a worker
    that has no other use for it: the tiny studies' worker, the preflight's estimate).
    """
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return None


def _torch_cpu_has(check: str) -> bool:
    import torch

    return bool(getattr(torch.cpu, check, lambda: False)())


@cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AMX tiles or AVX512-BF16 instructions).

    Without them torch emulates bf16 matmuls on CPU, slower than fp32; with them bf16 autocast
    trains about 1.5x faster than fp32 from hidden size 256 up (BENCHMARKS.md, "CPU precision").
    Linux's CPU flags where they can be read, else torch's checks.
    """
    flags = _linux_cpu_flags()
    if flags is not None:
        return "amx_tile" in flags or "avx512_bf16" in flags
    return _torch_cpu_has("_is_amx_tile_supported") or _torch_cpu_has("_is_avx512_bf16_supported")


@cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (bf16 matrix units: bf16 pays from smaller matrices)."""
    flags = _linux_cpu_flags()
    if flags is not None:
        return "amx_tile" in flags
    return _torch_cpu_has("_is_amx_tile_supported")


def cpu_bf16_min_hidden() -> int:
    """The hidden size from which bf16 autocast trains faster than fp32 on this CPU."""
    return CPU_BF16_MIN_HIDDEN_AMX if cpu_has_amx() else CPU_BF16_MIN_HIDDEN


def uses_autocast(kind: str, amp: bool, *, hidden: int) -> bool:
    """Whether a run on a ``kind`` device (``cuda``, ``cpu``...) trains under autocast.

    The rule: ``amp=False`` is always fp32. With ``amp=True`` accelerators always autocast;
    a CPU only when it has native bf16 (``cpu_has_native_bf16``) and the model's hidden size is
    at least ``cpu_bf16_min_hidden()`` (128 with AMX, else 256): emulated bf16 is slower than
    fp32, and so is native bf16 on matrices too small to pay for the casts (BENCHMARKS.md,
    "CPU precision").
    """
    if not amp:
        return False
    if kind != "cpu":
        return True
    return hidden >= cpu_bf16_min_hidden() and cpu_has_native_bf16()


def autocast_dtype(device: torch.device, amp: bool, *, hidden: int) -> torch.dtype | None:
    """The autocast dtype of a run, or None for full fp32 (the rule of ``uses_autocast``).

    CUDA uses bf16 where the GPU supports it, else fp16 (which needs a gradient scaler); a CPU
    uses bf16.

    Args:
        device: Where the run trains.
        amp: The trial's ``amp`` setting.
        hidden: The encoder's hidden size.
    """
    import torch

    if device.type not in ("cuda", "cpu") or not uses_autocast(device.type, amp, hidden=hidden):
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def precision_name(kind: str, amp: bool, *, hidden: int) -> str:
    """``fp32``, ``bf16`` or ``fp16``: what a run on a ``kind`` device computes in, by the rule
    of ``autocast_dtype`` (the trial's record says it; torch only for a CUDA run with amp).

    Example:
        >>> precision_name("cpu", True, hidden=64), precision_name("mps", True, hidden=1024)
        ('fp32', 'fp32')
    """
    if kind not in ("cuda", "cpu") or not uses_autocast(kind, amp, hidden=hidden):
        return "fp32"
    if kind == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """``torch.autocast`` on ``device`` in ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return nullcontext()
    import torch

    return torch.autocast(device_type=device.type, dtype=dtype)
