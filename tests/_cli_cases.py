"""Many ``search`` command lines in ONE real process, each with its own captured output.

Starting Python, optuna and SQLAlchemy costs about a second a command; a matrix of commands x
URLs would cost a minute of CI. ``run_cases`` starts one process that runs the real CLI
(``search.cli.app``) once per case, with the case's environment, its stdout and stderr
captured at the file descriptors (so gRPC's C core and every logger are caught too), and an
exception that escapes the CLI written as the traceback a user would see.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from _cli import search_env

DRIVER = r"""
import json, os, sys, tempfile, traceback
from search.cli import app

results = []
base = dict(os.environ)
for args, env in json.load(sys.stdin):
    os.environ.clear()
    os.environ.update(base)
    os.environ.update(env)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush(); sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        try:
            try:
                app(args=args, prog_name="search")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved[0], 1); os.dup2(saved[1], 2)
            os.close(saved[0]); os.close(saved[1])
        out.seek(0); err.seek(0)
        text = [f.read().decode(errors="replace") for f in (out, err)]
        results.append([code, *text])
print(json.dumps(results))
"""


@dataclass(frozen=True)
class Case:
    """One command line (after ``search``) and the variables set for it."""

    args: Sequence[str]
    env: Mapping[str, str]


@dataclass(frozen=True)
class Result:
    case: Case
    code: int
    stdout: str
    stderr: str


def run_cases(
    cases: Sequence[Case], *, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 300
) -> list[Result]:
    """Run every case in one process (``env`` under each case's own variables)."""
    payload = json.dumps([[list(c.args), dict(c.env)] for c in cases])
    done = subprocess.run(
        [sys.executable, "-c", DRIVER],
        input=payload,
        cwd=cwd,
        env=search_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return [
        Result(case, code, out, err) for case, (code, out, err) in zip(cases, rows, strict=True)
    ]
