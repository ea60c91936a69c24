"""Sizes and the device description."""

from __future__ import annotations

import psutil
import pytest

from search.memory.device import device_info
from search.memory.device import format_bytes
from search.memory.device import parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6GiB", 6 * 1024**3),
        ("512MB", 512 * 1000**2),
        ("2G", 2 * 1024**3),
        ("1.5GiB", 3 * 1024**3 // 2),
        ("1048576", 1048576),
        ("256 mib", 256 * 1024**2),
        ("1TB", 1000**4),
        ("64k", 64 * 1024),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "6 GiBs", "-1G", "0", "1..5G", "G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert "\n" not in str(info.value)


def test_cpu_device_without_limit() -> None:
    info = device_info("cpu")
    assert info.name == "cpu" and info.kind == "cpu"
    assert info.total_bytes == psutil.virtual_memory().total
    assert 0 < info.free_bytes <= info.total_bytes
    assert info.label.startswith("cpu (") and "GiB" in info.label


def test_memory_limit_caps_total_and_free() -> None:
    info = device_info("cpu", memory_limit=parse_size("1GiB"))
    assert info.total_bytes == 1024**3
    assert info.free_bytes <= 1024**3
    assert info.label == "cpu (limit 1.0 GiB)"
    assert info.total_mb == 1024.0


def test_limit_above_the_device_keeps_the_device_total() -> None:
    huge = 10 * psutil.virtual_memory().total
    assert device_info("cpu", memory_limit=huge).total_bytes == psutil.virtual_memory().total


def test_bad_device_and_limit() -> None:
    with pytest.raises(ValueError, match="unknown device"):
        device_info("tpu")
    with pytest.raises(ValueError, match="memory_limit"):
        device_info("cpu", memory_limit=0)


def test_format_bytes() -> None:
    assert format_bytes(79.1 * 1024**3) == "79.1 GiB"
    assert format_bytes(300 * 1024**2) == "300 MiB"


def test_one_precision_rule_for_the_loop_and_the_estimate() -> None:
    import torch

    from search.record import precision

    assert precision.device_type("cuda:1") == "cuda" and precision.device_type("cpu") == "cpu"
    assert precision.device_type("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = torch.device("cpu")
    for amp in (False, True):
        for hidden in (64, 255, 256, 1024):
            dtype = precision.autocast_dtype(cpu, amp, hidden=hidden)
            assert precision.uses_autocast("cpu", amp, hidden=hidden) == (dtype is not None)
    # Accelerators autocast whenever amp is on (the estimate's rule for cuda, xpu, mps...).
    assert precision.uses_autocast("cuda", True, hidden=64)
    assert not precision.uses_autocast("cuda", False, hidden=4096)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            precision.resolve_device("cuda")


def test_cpu_bf16_flags_without_torch_agree_with_torch() -> None:
    """The worker reads the CPU's bf16 units from Linux's flags, not torch (no 2 s import);
    where both answer they agree, and the answer came without importing torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from search.record import precision as p\n"
        "print(p._linux_cpu_flags() is not None, p.cpu_has_native_bf16(), p.cpu_has_amx(),"
        " 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    have_flags, native, amx, torch_imported = out.stdout.split()
    if have_flags != "True":
        pytest.skip("no /proc/cpuinfo flags here: torch's checks answer")
    assert torch_imported == "False"
    import torch

    assert native == str(
        bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    )
    assert amx == str(bool(torch.cpu._is_amx_tile_supported()))
