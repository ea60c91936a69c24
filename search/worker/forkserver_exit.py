"""Let the trial forkserver exit at once when its worker dies (imported only by it, preloaded).

The forkserver (``search.worker.isolation``) leaves its loop when the pipe from its worker
reaches EOF (the worker exited or was killed) and then runs the interpreter's shutdown, which
with torch and transformers loaded takes seconds on a busy host. It has nothing to flush or
save, so this module, preloaded last, registers an ``atexit`` handler (run first: last
registered) that ends the process with ``os._exit``. The handler is registered only when the
import happens inside ``multiprocessing.forkserver.main`` (the forkserver's preload), never in
a worker that imports this by mistake; forked trial children leave through ``os._exit`` and
never run ``atexit`` handlers.
"""

from __future__ import annotations

import atexit
import inspect
import os
from multiprocessing import forkserver

__all__ = ["in_forkserver"]


def in_forkserver() -> bool:
    """Whether this import runs in the forkserver's preload (``forkserver.main`` is calling)."""
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code is forkserver.main.__code__:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


if in_forkserver():
    atexit.register(os._exit, 0)
