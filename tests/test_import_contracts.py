"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and they catch a cycle.

``lint-imports`` (import-linter, the test extra) checks the layers of ``search`` (cli > observe >
worker > sampling > memory > spec > train > record), that ``storage`` imports nothing from
``search``, that no package holds an import cycle among its modules, and that only ``storage``
imports Optuna's and optuna-dashboard's private modules. Function-level imports count too:
grimp reads every import statement, not only the module-level ones.

The planted cases run on a copy of ``search/``, ``storage/`` and ``pyproject.toml``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports --no-cache`` with ``cwd``'s packages first on the path."""
    command = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [command, "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy(tmp_path: Path) -> Path:
    for name in ("search", "storage"):
        shutil.copytree(
            ROOT / name,
            tmp_path / name,
            ignore=shutil.ignore_patterns("__pycache__", "studies"),
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _plant(path: Path, line: str) -> None:
    text = path.read_text(encoding="utf-8")
    path.write_text(f"{text}\n{line}\n", encoding="utf-8")


def test_the_repository_keeps_every_contract() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    _plant(root / "search/record/attrs.py", "import search.cli  # planted: record -> cli")
    result = _lint_imports(root)
    out = result.stdout
    assert result.returncode != 0, out
    assert "search: layers" in out and "BROKEN" in out
    assert "search.record.attrs -> search.cli" in out
    # the upward edge also closes a cycle among search's packages
    assert "no cycle among the modules (or subpackages) of one package BROKEN" in out


def test_a_cycle_inside_one_package_is_named(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    # counts imports attrs; attrs importing counts back closes a cycle inside search.record,
    # which no layer sees (same package). Inside a function: still an import.
    _plant(
        root / "search/record/attrs.py",
        "def _planted() -> None:\n    import search.record.counts  # noqa: F401",
    )
    result = _lint_imports(root)
    out = result.stdout
    assert result.returncode != 0, out
    assert "no cycle among the modules (or subpackages) of one package BROKEN" in out
    broken = out.split("Broken contracts", 1)[1]
    assert "No cycles are allowed in search.record." in broken
    assert "- .counts -> .attrs" in broken or "- .attrs -> .counts" in broken
    assert "search: layers, top to bottom" in out and "KEPT" in out


def test_storage_may_not_import_search(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    _plant(root / "storage/_url.py", "import search.record.attrs  # planted: storage -> search")
    result = _lint_imports(root)
    assert result.returncode != 0, result.stdout
    assert "storage imports nothing from search BROKEN" in result.stdout
