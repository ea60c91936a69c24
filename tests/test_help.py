"""Every command's --help reads whole at 80 columns: nothing cut with an ellipsis, no line
past the edge, the description's paragraphs rewrapped (not broken where the docstring's
lines end)."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from search.cli.main import app


def _commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    if hasattr(group, "commands"):  # a group (typer's own click)
        for name, sub in group.commands.items():
            found += _commands(sub, (*path, name))
    return found


COMMANDS = _commands(typer.main.get_command(app))


def _description(lines: list[str]) -> list[list[str]]:
    """The paragraphs between the usage line and the first section (``Options:``...)."""
    paragraphs: list[list[str]] = [[]]
    for line in lines[1:]:
        if line.endswith(":") and not line.startswith(" "):
            break
        if line.strip():
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    return [p for p in paragraphs if p]


def test_every_command_is_there() -> None:
    assert {("run",), ("worker",), ("report",), ("spec", "schema")} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "search")
def test_help_reads_whole_at_80_columns(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    text = result.output.replace("[ARGS]...", "").replace("://...", "")
    assert "…" not in text and "..." not in text, result.output
    for paragraph in _description(lines):  # filled to the width, like click wraps it
        for line, following in zip(paragraph, paragraph[1:], strict=False):
            assert len(line) + 1 + len(following.split()[0]) > 78, (line, following)
