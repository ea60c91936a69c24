"""The ``search`` command (``search.cli.main``); ``app`` is the console script's entry point.

Only the command modules live here; each command imports what it runs when it runs, so
``search --help`` imports neither optuna's heavy parts nor torch.
"""

from search.cli.main import app

__all__ = ["app"]
