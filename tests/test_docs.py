"""The docs and the README say only what the CLI does: every `search ...` command in their
shell blocks (and inline code) names a real command and real options; the README stays a
front page."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer

from search.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "shell", "console")


def _shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command line) of each shell block, continuation lines joined."""
    found: list[tuple[int, str]] = []
    fence = None
    pending = ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip().split(" ")[0]
            continue
        if fence not in SHELL or not stripped or stripped.startswith("#"):
            continue
        stripped = stripped.removeprefix("$ ")
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        found.append((number, pending + stripped))
        pending = ""
    return found


def _search_calls(line: str) -> list[list[str]]:
    """The argument lists of every ``search`` call in one shell line."""
    calls = []
    for part in re.split(r"&&|\|\||[|;]", line):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:
            continue
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]  # VAR=value before the command
        if words and words[0] in ("search", "exec"):
            words = words[1:] if words[0] == "search" else words
            if words and words[0] == "search":
                words = words[1:]
            calls.append(words)
    return calls


def _check(call: list[str]) -> str:
    """What is wrong with one call ('' when the command and its options exist)."""
    command: Any = typer.main.get_command(app)
    words = list(call)
    path = ["search"]
    while words and hasattr(command, "commands") and words[0] in command.commands:
        command = command.commands[words[0]]
        path.append(words.pop(0))
    if hasattr(command, "commands") and words and words[0] != "--help":
        return f"{' '.join(path)} {words[0] if words else ''}: not a command".strip()
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    known.add("--help")
    for word in words:
        if word.startswith("-") and not re.match(r"^-\d", word):
            option = word.split("=", 1)[0]
            if option not in known:
                return f"{' '.join(path)}: no option {option}"
    return ""


def _inline_calls(text: str) -> list[tuple[int, str]]:
    """(line number, code) of each inline code span that starts with ``search ``."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for code in re.findall(r"`(search [a-z][^`]*)`", line):  # a command, not a name
            found.append((number, code.replace("…", "")))
    return found


CALLS = [
    (page, number, call)
    for page in PAGES
    for number, line in (
        _shell_lines(page.read_text(encoding="utf-8"))
        + _inline_calls(page.read_text(encoding="utf-8"))
    )
    for call in _search_calls(line)
]


def test_the_docs_show_commands() -> None:
    assert len(CALLS) >= 20  # the pages really were read


@pytest.mark.parametrize(
    ("page", "number", "call"),
    CALLS,
    ids=[f"{p.name}:{n}" for p, n, _ in CALLS],
)
def test_every_documented_command_exists(page: Path, number: int, call: list[str]) -> None:
    problem = _check(call)
    assert not problem, f"{page.relative_to(ROOT)}:{number}: search {shlex.join(call)}: {problem}"


def test_a_wrong_command_or_option_is_caught() -> None:
    assert _check(["run", "--study", "x"]) == ""
    assert "no option --nope" in _check(["run", "--nope"])
    assert "not a command" in _check(["storage", "nonsense"])


def test_the_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, len(lines)
