"""Optuna's and optuna-dashboard's private names are reached only through ``storage.compat``.

``lint-imports`` (pyproject's private-modules contract) catches an import of a private module;
this catches the other half, an attribute access such as ``study._storage`` or
``trial._trial_id`` anywhere in ``search/``. A private attribute may be read only where it is
defined: on ``self``/``cls``, or on an object of a class the same module defines (a
classmethod building its instance). ``storage/`` is exempt: ``storage.compat`` is the one
module that holds Optuna's private names (tests/test_optuna_compat.py checks each of them).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Private names of the standard library that are documented and meant to be called.
ALLOWED = {"os._exit"}


def _defined_privates(tree: ast.Module) -> set[str]:
    """Private names a module defines: its functions and methods, and ``self._x`` targets."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if name.startswith("_")}


def private_accesses(source: str, label: str) -> list[str]:
    """``label:line: expr`` for each private attribute ``source`` reads that it does not define."""
    tree = ast.parse(source)
    own = _defined_privates(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        attr = node.attr
        if not attr.startswith("_") or attr.startswith("__") or attr in own:
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        expr = ast.unparse(node)
        if expr not in ALLOWED:
            found.append(f"{label}:{node.lineno}: {expr}")
    return sorted(found)


def test_search_reads_no_private_attribute_of_optuna_objects() -> None:
    found = [
        hit
        for path in sorted((ROOT / "search").rglob("*.py"))
        for hit in private_accesses(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    ]
    assert found == [], "private names outside storage.compat:\n" + "\n".join(found)


def test_the_scan_sees_a_planted_private_access() -> None:
    source = (
        "import os\n"
        "class Worker:\n"
        "    def _watch(self): ...\n"
        "    @classmethod\n"
        "    def open(cls, study):\n"
        "        w = cls()\n"
        "        w._watch()  # its own class: allowed\n"
        "        os._exit(0)  # allowed\n"
        "        return study._storage, study._study_id\n"
    )
    assert private_accesses(source, "planted.py") == [
        "planted.py:9: study._storage",
        "planted.py:9: study._study_id",
    ]
