"""One install (``pip install -e .``) brings everything the commands use: the dashboard, W&B
and the plots are dependencies, not extras found one failing command at a time."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from search.observe.install import install_hint

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_what_the_commands_import_is_installed_with_the_package() -> None:
    core = _names(PROJECT["dependencies"])
    # search dashboard / notes, --wandb, report --plots (PNGs and the HTML page)
    assert {"optuna-dashboard", "wandb", "matplotlib", "plotly"} <= core
    # the old extras still resolve (older install lines) and add nothing
    extras = PROJECT["optional-dependencies"]
    assert all(extras[name] == [] for name in ("dashboard", "wandb", "plots"))


def test_the_install_hint_fits_a_clone() -> None:
    assert install_hint() == f"pip install -e {ROOT}"
