"""The ``search`` command (``search.cli.main``); ``app`` is the console script's entry point.

Only the command modules live here; each command imports what it runs when it runs, so
``search --help`` imports neither optuna's heavy parts nor torch.

At exit the interpreter's last garbage collections walk every object torch, transformers and
optuna created (2-4 s of CPU for a ``search run``, BENCHMARKS.md "Issue 17"); nothing left is
garbage worth finding then, so the objects are frozen out of those passes (``gc.freeze``, run
after every other exit handler: it is registered first).
"""

import atexit
import gc

atexit.register(gc.freeze)

from search.cli.main import app  # noqa: E402 - after the exit handler, so it runs last

__all__ = ["app"]
