"""A trial's child keeps glibc's own malloc mmap threshold; the estimate's calibration fixes it.

Observed for real in the child: glibc's threshold is dynamic (freeing an mmapped chunk raises it
to that chunk's size), so after a 4 MiB block was freed, a 2 MiB block comes from the heap;
fixed at 1 MiB it is mmapped. ``mallinfo2().hblks`` counts the mmapped chunks.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import pytest
from _factories import trial_config

from search.record.config import TrialConfig
from search.worker.isolation import MALLOC_MMAP_THRESHOLD
from search.worker.isolation import MMAP_THRESHOLD_ENV
from search.worker.isolation import run_isolated
from search.worker.isolation import warm_up

HERE = "test_malloc_threshold"
MIB = 1024**2

_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
           "fordblks", "keepcost")  # fmt: skip


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS]


def _libc() -> Any:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _Mallinfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def _glibc_with_mallinfo2() -> bool:
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION") or ""
        return version.startswith("glibc") and hasattr(ctypes.CDLL(None), "mallinfo2")
    except (OSError, ValueError):
        return False


pytestmark = pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33")


def mmaps_a_2_mib_block(cfg: TrialConfig, *, report: Any = None, on_phase: Any = None) -> Any:
    """In the child: is a 2 MiB block mmapped after a 4 MiB mmapped block was freed?"""
    libc = _libc()
    libc.free(libc.malloc(4 * MIB))  # under the dynamic threshold: raises it to >= 4 MiB
    before = libc.mallinfo2().hblks
    block = libc.malloc(2 * MIB)
    mmapped = libc.mallinfo2().hblks - before
    libc.free(block)
    return {"metrics": {"ndcg@10": 0.0, "mmapped": float(mmapped)}}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MMAP_THRESHOLD_ENV, raising=False)
    warm_up(f"{HERE}:mmaps_a_2_mib_block")


def _mmapped(**kwargs: Any) -> float:
    out = run_isolated(trial_config(), objective=f"{HERE}:mmaps_a_2_mib_block", **kwargs)
    assert out.status == "complete", out.error
    return out.metrics["mmapped"]


def test_a_trial_child_keeps_glibcs_dynamic_threshold() -> None:
    assert _mmapped() == 0.0  # served from the heap: the threshold rose, as glibc does
    assert _mmapped(mmap_threshold=0) == 0.0


def test_the_calibration_opts_in_to_the_fixed_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _mmapped(mmap_threshold=MALLOC_MMAP_THRESHOLD) == 1.0
    monkeypatch.setenv(MMAP_THRESHOLD_ENV, str(MALLOC_MMAP_THRESHOLD))
    assert _mmapped() == 1.0
    assert _mmapped(mmap_threshold=0) == 0.0  # the explicit argument wins over the variable


def test_a_cpu_memory_limit_fixes_it_unless_the_variable_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Under --memory-limit on CPU the estimate decides what runs, so the child runs the peak
    # the estimate predicts (the fixed threshold's).
    assert trial_config().device == "cpu"
    assert _mmapped(memory_limit_bytes=2**30) == 1.0
    monkeypatch.setenv(MMAP_THRESHOLD_ENV, "0")
    assert _mmapped(memory_limit_bytes=2**30) == 0.0
