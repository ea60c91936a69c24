"""The one way tests run the ``search`` command: a subprocess, as a user would, with the test env.

``run_search("report", "--study", "s", cwd=tmp_path)`` runs ``python -m search.cli report --study
s`` in ``tmp_path`` and returns the finished process (``returncode``, ``stdout``, ``stderr``).
The environment (``search_env``) is the test's own with Hugging Face offline, the repository
and ``tests/fixtures`` (the fake objectives) importable, and the developer's
``SEARCH_STORAGE``/``SEARCH_STORAGE_FILE`` dropped unless the test sets them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
# A developer's storage must never leak into a test's command.
_STORAGE_VARS = ("SEARCH_STORAGE", "SEARCH_STORAGE_FILE")


def search_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a test's ``search`` command: ``os.environ`` offline, the repository
    and ``tests/fixtures`` on ``PYTHONPATH``, no inherited storage variables; ``env`` on top."""
    full = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(FIXTURES), str(ROOT)]),
    }
    for name in _STORAGE_VARS:
        full.pop(name, None)
    return full | dict(env or {})


def run_search(
    *args: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
    python_flags: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run ``search ARGS`` (``python [FLAGS] -m search.cli ARGS``) to its end; never raises on
    a non-zero exit (the test reads ``returncode``, ``stdout`` and ``stderr``).

    Args:
        args: The command line after ``search``.
        cwd: The working directory (where a default ``search.db`` would go).
        env: Variables on top of ``search_env()``.
        timeout: Seconds before ``subprocess.TimeoutExpired`` fails the test.
        python_flags: Interpreter flags, e.g. ``("-X", "importtime")``.
    """
    return subprocess.run(
        [sys.executable, *python_flags, "-m", "search.cli", *args],
        cwd=cwd,
        env=search_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
