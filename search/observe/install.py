"""How to install what a command found missing, right for a clone and for an installed package.

optuna-dashboard, wandb, matplotlib and plotly are dependencies of the package, so a missing one
means a broken or partial install: the hint reinstalls the package the way it was installed.

Example:
    >>> hint = install_hint()
    >>> hint.startswith("pip install ")
    True
"""

from __future__ import annotations

import shlex
from pathlib import Path

import search

PACKAGE = "ko-retrieval-search"

__all__ = ["PACKAGE", "install_hint"]


def install_hint() -> str:
    """``pip install -e DIR`` for a clone (its ``pyproject.toml`` beside the package), else
    ``pip install ko-retrieval-search``."""
    root = Path(search.__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file():
        return f"pip install -e {shlex.quote(str(root))}"
    return f"pip install {PACKAGE}"
