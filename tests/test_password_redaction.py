"""No password reaches any output on any command's error path (issue 18).

Every ``search`` command that takes a storage (listed from ``search --help``) fails against a
gRPC and a PostgreSQL URL whose password holds ``/ ? # @ : %``, written raw and
percent-encoded, given by ``--storage``, ``$SEARCH_STORAGE`` and ``$SEARCH_STORAGE_FILE``;
nothing listens where they point. Each must exit non-zero with one error line and no
traceback, and the password must not appear, in any spelling, in its stdout or stderr. The
matrix runs in one process (``_cli_cases``); the issue's own case, ``search proxy --storage
grpc://user:PASSWORD@...``, runs as its own process too.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote
from urllib.parse import quote_plus

import pytest
from _cli import run_search
from _cli_cases import Case
from _cli_cases import Result
from _cli_cases import run_cases

# Each command that opens the storage, with what it needs to get that far.
COMMANDS = {
    "run": ["run", "--study", "ko-retrieval", "--tiny", "--no-preflight"],
    "worker": ["worker", "--study", "ko-retrieval", "--tiny", "--no-preflight"],
    "report": ["report", "--study", "s"],
    "report --plots": ["report", "--study", "s", "--plots", "plots"],
    "report --publish": ["report", "--study", "s", "--publish"],
    "best": ["best", "--study", "s"],
    "best --export": ["best", "--study", "s", "--export", "export"],
    "refine": ["refine", "--study", "s"],
    "dashboard": ["dashboard"],
    "proxy": ["proxy"],
    "storage check": ["storage", "check"],
    "storage check --upgrade": ["storage", "check", "--upgrade"],
}
FAST = {"SEARCH_CONNECT_TIMEOUT": "0.2"}


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def secret() -> tuple[str, list[str]]:
    """A password with every URL delimiter, and each spelling of it that must not leak."""
    core = uuid.uuid4().hex[:12]
    password = f"pw/{core}?#@:%x"
    return password, [password, quote(password, safe=""), quote_plus(password), core]


def _urls(password: str) -> dict[str, str]:
    port, encoded = _dead_port(), quote(password, safe="")
    return {
        "grpc raw": f"grpc://user:{password}@127.0.0.1:{port}",
        "grpc encoded": f"grpc://user:{encoded}@127.0.0.1:{port}",
        "postgresql raw": f"postgresql://user:{password}@127.0.0.1:{port}/db",
        "postgresql encoded": f"postgresql://user:{encoded}@127.0.0.1:{port}/db",
    }


def test_the_commands_listed_are_every_command_that_takes_a_storage() -> None:
    import typer

    from search.cli import app

    def walk(group: Any, prefix: str) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name, command in group.commands.items():
            if hasattr(command, "commands"):  # a group (typer's own click)
                found |= walk(command, f"{prefix}{name} ")
            else:
                found[f"{prefix}{name}"] = command
        return found

    commands = walk(typer.main.get_command(app), "")
    with_storage = {
        name
        for name, command in commands.items()
        if any("--storage" in param.opts for param in command.params)
    }
    assert with_storage == {" ".join(args[:2]) if args[0] == "storage" else args[0]
                            for args in COMMANDS.values()}  # fmt: skip


def _assert_quiet(result: Result, forms: list[str]) -> None:
    shown = f"{result.case.args} {sorted(result.case.env)}:\n{result.stdout}{result.stderr}"
    assert result.code != 0, shown
    assert "Traceback" not in result.stderr + result.stdout, shown
    for form in forms:
        assert form not in result.stdout and form not in result.stderr, (form, shown)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), shown


def test_no_command_prints_the_password_of_a_grpc_or_postgresql_url(
    tmp_path: Path, secret: tuple[str, list[str]]
) -> None:
    password, forms = secret
    cases = []
    for kind, url in _urls(password).items():
        url_file = tmp_path / f"{kind.replace(' ', '_')}.url"
        url_file.write_text(url + "\n")
        for args in COMMANDS.values():
            cases.append(Case([*args, "--storage", url], FAST))
        for args in (COMMANDS["report"], COMMANDS["proxy"]):  # the URL from the environment
            cases.append(Case(list(args), {**FAST, "SEARCH_STORAGE": url}))
            cases.append(Case(list(args), {**FAST, "SEARCH_STORAGE_FILE": str(url_file)}))
    results = run_cases(cases, cwd=tmp_path, timeout=600)
    for result in results:
        _assert_quiet(result, forms)
    assert not (tmp_path / "search.db").exists()  # nothing fell back to the default storage


def test_search_proxy_with_a_grpc_url_hides_its_password(
    tmp_path: Path, secret: tuple[str, list[str]]
) -> None:
    """The issue's report, as the user ran it: its own process, the password in argv."""
    password, forms = secret
    url = _urls(password)["grpc raw"]
    done = run_search("proxy", "--storage", url, cwd=tmp_path, env=FAST, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "user:***@127.0.0.1" in done.stderr
    for form in forms:
        assert form not in done.stdout + done.stderr, form
