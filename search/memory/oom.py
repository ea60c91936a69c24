"""Out-of-memory detection: is this exception an OOM, and give the device memory back.

Detection is kept apart from anything that acts on it (the isolation boundary, the runner), so
that tests can feed it any exception, as accelerate's ``utils/memory.py`` does with
``should_reduce_batch_size``. Every message the service treats as "out of memory" is in the one
list :data:`OOM_PATTERNS`.
"""

from __future__ import annotations

import gc

import torch

__all__ = ["OOM_PATTERNS", "is_oom_error", "release_device_memory"]

# Substrings (matched case-insensitively) of exception messages that mean "out of memory".
# A superset of accelerate's ``should_reduce_batch_size`` (utils/memory.py, 2022-2025) and of
# Lightning's ``is_oom_error`` (pytorch_lightning/utilities/memory.py, after toma).
OOM_PATTERNS: tuple[str, ...] = (
    # Generic: "CUDA out of memory." (CUDA caching allocator), "HIP out of memory." (ROCm),
    # "XPU out of memory." (Intel), "MPS backend out of memory" (Apple), "CUDA error: out of
    # memory" (a failing kernel launch or cudaMalloc outside the allocator), "NPU out of memory".
    "out of memory",
    # cuDNN cannot get workspace memory for the chosen algorithm (pytorch/pytorch#4107); both
    # references treat it as an OOM.
    "cudnn_status_not_supported",
    # Library handles and workspaces that failed to allocate.
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cusolver_status_alloc_failed",
    "cusparse_status_alloc_failed",
    "cufft_alloc_failed",
    # Runtime error codes as printed by CUDA / ROCm / Level Zero.
    "cudaerrormemoryallocation",
    "hiperroroutofmemory",
    "ur_result_error_out_of_device_memory",
    "ze_result_error_out_of_device_memory",
    # Habana Gaudi (HPU): "FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed" (accelerate).
    "pt_devmem allocation failed",
    # CPU: torch's "DefaultCPUAllocator: can't allocate memory: you tried to allocate ...",
    # ENOMEM as strerror, and C++'s std::bad_alloc surfacing through a RuntimeError.
    "can't allocate memory",
    "cannot allocate memory",
    "std::bad_alloc",
)


def _message(exc: BaseException) -> str:
    """All of an exception's text: ``str`` and every string argument (lower-cased)."""
    parts = [str(exc)]
    parts.extend(a for a in exc.args if isinstance(a, str))
    return " ".join(parts).lower()


def _is_oom_one(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        text = _message(exc)
        return any(p in text for p in OOM_PATTERNS)
    return False


def is_oom_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the process ran out of (device or host) memory.

    True for ``torch.OutOfMemoryError`` (and its subclasses), ``MemoryError``, and any
    ``RuntimeError`` whose message holds one of :data:`OOM_PATTERNS`; the chain of
    ``__cause__`` / ``__context__`` is followed, so an OOM re-raised as another error still
    counts. Anything else is a real failure.

    Example:
        >>> is_oom_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        True
        >>> is_oom_error(RuntimeError("something else"))
        False

    Args:
        exc: The exception to classify.

    Returns:
        True when the exception or one of its causes is an out-of-memory error.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if _is_oom_one(e):
            return True
        todo.extend(c for c in (e.__cause__, e.__context__) if c is not None)
    return False


def release_device_memory() -> None:
    """Collect garbage and empty the caching allocators of the available backends.

    Only backends already initialised are touched, so calling it never creates a CUDA
    context in a process that had none.
    """
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        xpu.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()
