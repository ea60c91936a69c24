"""Fixtures shared by the test modules, and the rule that CI cannot go green by skipping.

Under CI (``CI=true``) a skipped test marked ``postgres``, ``train`` or ``shared_data`` is a
failure carrying the skip's reason: a missing server, database or data set must fail the run,
not hide the tests that prove what the README says. Tests using the ``pg_url`` fixture are
marked ``postgres`` and those using ``klue_json`` ``shared_data`` automatically. A test marked
``pg_restart`` (it restarts the shared PostgreSQL server, cutting off everyone else on it) runs
only with ``SEARCH_TEST_PG_RESTART_OK=1``, which ``.ci/run`` sets. A test module skipped while
collecting (a module-level ``pytest.importorskip``) is a collection error under CI.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from collections.abc import Iterator
from pathlib import Path

import pytest
from _factories import KLUE_JSON
from _factories import PG_URL
from _factories import ci
from _factories import ensure_pg_database
from _factories import fresh_pg_database

# Skipping one of these under CI fails the run.
MUST_RUN_UNDER_CI = ("postgres", "train", "shared_data")
# Doctest collection must not import these scripts (they run workers when imported as files).
collect_ignore = ["fixtures"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the fixtures they use; gate the server-restarting ones."""
    restart_ok = os.environ.get("SEARCH_TEST_PG_RESTART_OK") == "1"
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "pg_url" in names:
            item.add_marker(pytest.mark.postgres)
        if "klue_json" in names:
            item.add_marker(pytest.mark.shared_data)
        if item.get_closest_marker("pg_restart") and not restart_ok:
            item.add_marker(
                pytest.mark.skip(
                    reason="restarts the shared PostgreSQL server: "
                    "set SEARCH_TEST_PG_RESTART_OK=1 to run it (.ci/run does)"
                )
            )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under CI, turn the skip of a must-run test into a failure that says why it skipped."""
    report = yield
    if report.skipped and ci() and not hasattr(report, "wasxfail"):
        marks = [m for m in MUST_RUN_UNDER_CI if item.get_closest_marker(m)]
        if marks:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            reason = str(reason).removeprefix("Skipped: ")
            report.outcome = "failed"
            report.longrepr = (
                f"skipped under CI=true, which must run every test marked {'/'.join(marks)}: "
                f"{reason}"
            )
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """Under CI, a module skipped while collecting (``importorskip`` or ``pytest.skip`` at
    module level) is a collection error naming the module and the skip's reason.

    Such a skip happens before any test exists, so ``pytest_runtest_makereport`` never sees it:
    every test in the module would vanish from the run without a trace but a line under -rs.
    """
    report = yield
    if report.skipped and ci():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        reason = str(reason).removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = (
            f"{collector.nodeid or collector.name} skipped while collecting under CI=true, which "
            f"must run every test module: {reason}"
        )
    return report


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The test PostgreSQL URL (``SEARCH_TEST_PG_URL``), its database created when missing.

    Skips (fails under CI) with the real cause: server unreachable, or database missing and
    not creatable.
    """
    problem = ensure_pg_database(PG_URL)
    if problem is not None:
        pytest.skip(f"{problem} (SEARCH_TEST_PG_URL)")
    return PG_URL


@pytest.fixture
def pg_db(pg_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test alone (its URL), dropped afterwards.

    No other test's studies or locks in it, so study names need not be invented, and the test
    may cut its connections. Marks the test ``postgres`` (it uses ``pg_url``).
    """
    with fresh_pg_database(pg_url, "search_t") as url:
        yield url


@pytest.fixture(scope="session")
def klue_json() -> Path:
    """The KLUE-NLI dev file under the shared data (``SEARCH_TEST_SHARED_DATA``), or skip."""
    if not KLUE_JSON.is_file():
        pytest.skip(
            f"KLUE-NLI data not found at {KLUE_JSON} (SEARCH_TEST_SHARED_DATA, "
            f"default ../shared/data)"
        )
    return KLUE_JSON


@pytest.fixture(scope="session", autouse=True)
def _search_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The run's data and token cache (``search.train.cache``) in a temporary directory of its
    own, never the user's (``$SEARCH_CACHE``, which tests may point at built replicas, is left
    alone). Trial processes inherit the environment."""
    directory = tmp_path_factory.mktemp("data-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEARCH_DATA_CACHE", str(directory))
        yield directory


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the test (step timings and numerics as the benches run them)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
