"""Errors the CLI shows as one line (kept free of heavy imports so ``search --help`` is fast)."""

from __future__ import annotations


class RunError(RuntimeError):
    """The run cannot go on (e.g. a model's weights cannot be loaded); one-line message."""
