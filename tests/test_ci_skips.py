"""CI cannot go green by skipping: the conftest rule, run for real on a generated test file."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import sqlalchemy
from _factories import ensure_pg_database
from sqlalchemy.pool import NullPool

TESTS = Path(__file__).resolve().parent
GENERATED = """
import pytest

@pytest.mark.postgres
def test_postgres_marked_skip():
    pytest.skip("server gone")

@pytest.mark.train
def test_train_marked_skip():
    pytest.skip("no weights")

def test_unmarked_skip():
    pytest.skip("an optional extra")

def test_uses_pg_url(pg_url):
    pass

def test_uses_klue(klue_json):
    pass

@pytest.mark.postgres
@pytest.mark.pg_restart
def test_restarts_the_server():
    pass

def test_passes():
    pass
"""


def _run(
    tmp_path: Path, files: dict[str, str] | None = None, **env: str
) -> tuple[int, dict[str, str], str]:
    """Run pytest on generated test files (``GENERATED`` by default) with the project's
    conftest; outcome per test."""
    work = tmp_path / uuid.uuid4().hex[:8]
    work.mkdir()
    for name in ("conftest.py", "_factories.py"):
        shutil.copy(TESTS / name, work / name)
    for name, text in (files or {"test_generated.py": GENERATED}).items():
        (work / name).write_text(text)
    markers = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"][
        "ini_options"
    ]["markers"]
    (work / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n" + "".join(f"    {m}\n" for m in markers)
    )
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "SEARCH_TEST_PG_RESTART_OK")}
    base |= {
        "SEARCH_TEST_PG_URL": "postgresql://postgres@127.0.0.1:1/search_test",  # nobody there
        "SEARCH_TEST_SHARED_DATA": str(tmp_path / "no-shared-data"),
    }
    junit = work / "junit.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}"],
        cwd=work,
        env=base | env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    outcomes: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name", "")] = (
            "failed" if {"failure", "error"} & set(kinds) else kinds[0] if kinds else "passed"
        )
    return proc.returncode, outcomes, proc.stdout


def test_without_ci_the_missing_server_and_data_skip(tmp_path: Path) -> None:
    rc, outcomes, out = _run(tmp_path)
    assert rc == 0, out
    assert outcomes == {
        "test_postgres_marked_skip": "skipped",
        "test_train_marked_skip": "skipped",
        "test_unmarked_skip": "skipped",
        "test_uses_pg_url": "skipped",
        "test_uses_klue": "skipped",
        "test_restarts_the_server": "skipped",
        "test_passes": "passed",
    }
    assert "restarts the shared PostgreSQL server: set SEARCH_TEST_PG_RESTART_OK=1" in out


def test_under_ci_a_skipped_must_run_test_fails_with_its_reason(tmp_path: Path) -> None:
    rc, outcomes, out = _run(tmp_path, CI="true")
    assert rc == 1, out
    assert outcomes == {
        "test_postgres_marked_skip": "failed",
        "test_train_marked_skip": "failed",
        "test_unmarked_skip": "skipped",  # the rule covers postgres, train and shared_data only
        "test_uses_pg_url": "failed",  # marked postgres by the fixture it uses
        "test_uses_klue": "failed",  # marked shared_data by the fixture it uses
        "test_restarts_the_server": "failed",  # CI must ask for it
        "test_passes": "passed",
    }
    assert "server gone" in out and "no weights" in out
    assert "PostgreSQL server unreachable at postgresql://postgres@127.0.0.1:1/search_test" in out
    assert f"KLUE-NLI data not found at {tmp_path / 'no-shared-data'}" in out


def test_under_ci_asking_for_the_restart_test_runs_it(tmp_path: Path) -> None:
    rc, outcomes, out = _run(tmp_path, CI="1", SEARCH_TEST_PG_RESTART_OK="1")
    assert rc == 1, out  # the other must-run skips still fail
    assert outcomes["test_restarts_the_server"] == "passed"
    assert outcomes["test_unmarked_skip"] == "skipped"


PLANTED = """
import pytest

gone = pytest.importorskip("no_such_module_ci_skips", reason="pip install no-such-module")

def test_never_collected():
    pass
"""
PASSING = """
def test_passes():
    pass
"""


def test_without_ci_a_module_skipped_while_collecting_is_a_skip(tmp_path: Path) -> None:
    rc, outcomes, out = _run(tmp_path, {"test_planted.py": PLANTED, "test_ok.py": PASSING})
    assert rc == 0, out
    assert outcomes == {"test_passes": "passed", "test_planted": "skipped"}  # the module
    assert "SKIPPED [1] test_planted.py:4: pip install no-such-module" in out


def test_under_ci_a_module_skipped_while_collecting_fails_the_run(tmp_path: Path) -> None:
    """A module-level importorskip skips before any test exists, so the per-test rule cannot
    see it: under CI it is a collection error naming the module and the reason."""
    rc, _, out = _run(tmp_path, {"test_planted.py": PLANTED, "test_ok.py": PASSING}, CI="true")
    assert rc == pytest.ExitCode.INTERRUPTED, out  # pytest stops at a collection error
    assert "ERROR collecting test_planted.py" in out
    assert (
        "test_planted.py skipped while collecting under CI=true, which must run every test "
        "module: pip install no-such-module"
    ) in out


# A command that restarts PostgreSQL, in a test's string constants (this file only names them).
RESTART_COMMAND = re.compile(r"\bpg_ctl(?:cluster)?\b|\b(?:systemctl|service)\b.*\brestart\b")


def _docstrings(tree: ast.Module) -> set[int]:
    """The ids of the docstring nodes in ``tree`` (prose may say "restart")."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _restarts(node: ast.AST, restarting: set[str], prose: set[int]) -> bool:
    """Whether ``node`` names a restart command (not in a docstring) or a restarting name."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            if id(sub) not in prose and RESTART_COMMAND.search(sub.value):
                return True
        elif isinstance(sub, ast.Name) and sub.id in restarting:
            return True
        elif isinstance(sub, ast.arg) and sub.arg in restarting:
            return True
    return False


def _module_names(tree: ast.Module) -> dict[str, ast.AST]:
    """Module-level name -> what defines it (function, class, assignment or import)."""
    defs: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defs[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defs[name.id] = node
    return defs


def _restarting_names(path: Path, seed: dict[str, set[str]]) -> set[str]:
    """The module-level names of ``path`` that restart the server or name the command: to a
    fixpoint over its own names, starting from the names it imports from ``seed``'s helper
    modules (``tests/_x.py``) that do, and the restarting fixtures of conftest (``seed[""]``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    prose = _docstrings(tree)
    restarting = set(seed.get("", set()))
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module in seed:
            restarting |= {a.asname or a.name for a in node.names if a.name in seed[node.module]}
    defs = _module_names(tree)
    grew = True
    while grew:
        new = {name for name, node in defs.items() if _restarts(node, restarting, prose)}
        grew = not new <= restarting
        restarting |= new
    return restarting


def _restarting_tests() -> dict[str, Path]:
    """The tests under tests/ that restart the server, from their source: junit name
    (``tests.test_x.test_y``) -> file. A test restarts when its body (or a fixture argument)
    reaches a restart command through its module's constants, helpers and fixtures, the helper
    modules' (``tests/_x.py``) it imports, or conftest's fixtures."""
    seed: dict[str, set[str]] = {}
    for helper in sorted(TESTS.glob("_*.py")):
        seed[helper.stem] = _restarting_names(helper, seed)
    seed[""] = _restarting_names(TESTS / "conftest.py", seed)
    found: dict[str, Path] = {}
    for path in sorted(TESTS.rglob("test_*.py")):
        if path == Path(__file__).resolve():
            continue
        restarting = _restarting_names(path, seed)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        prose = _docstrings(tree)
        module = ".".join(path.relative_to(TESTS.parent).with_suffix("").parts)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.name.startswith("test") and _restarts(node, restarting, prose):
                    found[f"{module}.{node.name}"] = path
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name.startswith("test"):
                        if _restarts(item, restarting, prose):
                            found[f"{module}.{node.name}.{item.name}"] = path
    return found


def test_the_pg_restart_gate_holds() -> None:
    """Every test that restarts the server is marked pg_restart, `pytest -m pg_restart` finds
    them, and without SEARCH_TEST_PG_RESTART_OK=1 each is skipped, never run."""
    restarting = _restarting_tests()
    assert restarting, "no test restarts the server: the restart test went missing"
    junit = TESTS.parent / f".pg-restart-gate-{uuid.uuid4().hex[:8]}.xml"
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "SEARCH_TEST_PG_RESTART_OK")}
    # Should the gate not hold, still restart nothing: no server to reach, a no-op restart.
    env |= {
        "SEARCH_TEST_PG_URL": "postgresql://postgres@127.0.0.1:1/search_test",
        "SEARCH_TEST_PG_RESTART": "true",
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", "pg_restart", "-p", "no:cacheprovider"]
            + ["-o", "addopts=", "-rs", f"--junitxml={junit}"]
            + sorted({str(path.relative_to(TESTS.parent)) for path in restarting.values()}),
            cwd=TESTS.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        # 5: nothing collected, none marked (named below)
        assert proc.returncode in (0, 5), proc.stdout + proc.stderr
        skipped: dict[str, str] = {}
        for case in ET.parse(junit).getroot().iter("testcase"):
            skip = case.find("skipped")
            name = f"{case.get('classname')}.{case.get('name')}"
            skipped[name] = "" if skip is None else skip.get("message", "")
    finally:
        junit.unlink(missing_ok=True)
    unmarked = set(restarting) - set(skipped)
    assert not unmarked, f"restart the server without @pytest.mark.pg_restart: {unmarked}"
    gate = "restarts the shared PostgreSQL server: set SEARCH_TEST_PG_RESTART_OK=1"
    for name, reason in skipped.items():
        assert gate in reason, f"{name} was not skipped by the gate: {reason or 'it ran'}"


@pytest.mark.postgres
def test_pg_fixture_creates_a_missing_database(pg_url: str) -> None:
    name = f"search_test_ci_{uuid.uuid4().hex[:8]}"
    url = sqlalchemy.engine.make_url(pg_url)
    missing = url.set(database=name).render_as_string(hide_password=False)
    admin = sqlalchemy.create_engine(
        url.set(database="postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    exists = sqlalchemy.text("SELECT count(*) FROM pg_database WHERE datname = :n")
    try:
        with admin.connect() as conn:
            assert conn.execute(exists, {"n": name}).scalar() == 0
        assert ensure_pg_database(missing) is None
        with admin.connect() as conn:
            assert conn.execute(exists, {"n": name}).scalar() == 1
        assert ensure_pg_database(missing) is None  # and reuses it the second time
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.postgres
def test_pg_fixture_names_a_refused_role_not_an_unreachable_server(pg_url: str) -> None:
    url = sqlalchemy.engine.make_url(pg_url).set(username="no_such_role_d", database="nodb_d")
    problem = ensure_pg_database(url.render_as_string(hide_password=False))
    assert problem is not None
    assert "refused the connection" in problem and "no_such_role_d" in problem
    assert "unreachable" not in problem
