"""Every out-of-memory message of the reference lists is an OOM; nothing else is."""

from __future__ import annotations

import pytest
import torch

from search.memory.oom import OOM_PATTERNS
from search.memory.oom import is_oom_error
from search.memory.oom import release_device_memory
from search.worker.isolation import host_oom_evidence

# huggingface/accelerate, src/accelerate/utils/memory.py, should_reduce_batch_size: both the
# 2022 list and the current one (" out of memory." for CUDA/HIP/XPU, plus Habana's PT_DEVMEM).
ACCELERATE = [
    "CUDA out of memory.",
    "XPU out of memory.",
    " out of memory.",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.",
    "DefaultCPUAllocator: can't allocate memory",
    "FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed",
]
# Lightning, pytorch_lightning/utilities/memory.py, is_oom_error (after BlackHC/toma):
# is_cuda_out_of_memory ("CUDA" and "out of memory"), is_cudnn_snafu, is_out_of_cpu_memory.
LIGHTNING = [
    "CUDA out of memory.",
    "CUDA error: out of memory",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.",
    "DefaultCPUAllocator: can't allocate memory",
]
# Messages as the backends print them (torch 2.x, ROCm, Intel, Apple, cuBLAS, C++).
BACKENDS = [
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.1 GiB",
    "HIP out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 63.98 GiB",
    "XPU out of memory. Tried to allocate 512.00 MiB (GPU 0; 64.00 GiB total capacity)",
    "MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.2 GB)",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 67108864 bytes. Error code 12 (Cannot allocate memory)",
    "std::bad_alloc",
    "UR_RESULT_ERROR_OUT_OF_DEVICE_MEMORY",
    "[Rank:0] FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed for size::939524096 (896)MB",
]


@pytest.mark.parametrize("message", ACCELERATE + LIGHTNING + BACKENDS)
def test_reference_messages_are_oom(message: str) -> None:
    assert is_oom_error(RuntimeError(message))


def test_oom_exception_types() -> None:
    assert is_oom_error(torch.OutOfMemoryError("anything"))
    assert is_oom_error(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert is_oom_error(MemoryError())


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("something else"),
        RuntimeError("CUDA error: device-side assert triggered"),
        RuntimeError("Expected all tensors to be on the same device"),
        ValueError("out of memory"),  # only RuntimeError messages count
        KeyError("cuda"),
        RuntimeError(),
    ],
)
def test_other_errors_are_not_oom(exc: BaseException) -> None:
    assert not is_oom_error(exc)


def test_chained_causes_are_followed() -> None:
    try:
        try:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")
        except RuntimeError as inner:
            raise ValueError("training step failed") from inner
    except ValueError as outer:
        assert is_oom_error(outer)
    try:
        try:
            raise MemoryError()
        except MemoryError:
            raise KeyError("while handling")  # noqa: B904 - implicit __context__ on purpose
    except KeyError as outer:
        assert is_oom_error(outer)
    plain = ValueError("x")
    plain.__cause__ = RuntimeError("no memory problem here")
    assert not is_oom_error(plain)


def test_cyclic_chain_terminates() -> None:
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert not is_oom_error(a)


def test_patterns_are_lower_case_and_unique() -> None:
    assert all(p == p.lower() for p in OOM_PATTERNS)
    assert len(set(OOM_PATTERNS)) == len(OOM_PATTERNS)


def test_real_cpu_allocation_failure_is_oom() -> None:
    with pytest.raises(RuntimeError) as info:
        torch.empty(2**62, dtype=torch.uint8)
    assert is_oom_error(info.value)


def test_release_device_memory_runs_without_cuda() -> None:
    release_device_memory()
    assert not torch.cuda.is_initialized()


# host_oom_evidence: every input combination has exactly one answer. Counter readings are
# (before, after), None where unreadable; the low-memory threshold is 5% of the host's total.
@pytest.mark.parametrize(
    ("kills_before", "kills_after", "lowest_available", "expected"),
    [
        (0, 1, 0.50, "cgroup oom_kill 0 -> 1"),  # the counter grew: host OOM
        (4, 7, 0.01, "cgroup oom_kill 4 -> 7"),  # the counter wins over low memory
        (0, 0, 0.50, None),  # no kill, memory fine: not an OOM (e.g. a user's kill -9)
        (3, 3, 0.049, "host memory available fell to 4.9%"),  # no kill counted, memory low
        (3, 3, 0.05, None),  # at the threshold is not under it
        (5, 2, 0.50, None),  # a counter that went down (cgroup recreated) proves nothing
        (None, 1, 0.50, None),  # one reading missing: no counter evidence
        (1, None, 0.50, None),
        (None, None, 0.50, None),
        (None, None, 0.001, "host memory available fell to 0.1%"),
        (None, 9, 0.0, "host memory available fell to 0.0%"),
    ],
)
def test_host_oom_evidence_has_one_answer_per_input(
    kills_before: int | None,
    kills_after: int | None,
    lowest_available: float,
    expected: str | None,
) -> None:
    assert host_oom_evidence(kills_before, kills_after, lowest_available) == expected
