"""``search spec schema``: the spec's JSON Schema, generated from the models that load a spec;
the shipped specs validate against it, mistakes the loader refuses are refused by it too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from search.spec.schema import spec_schema
from search.spec.study_spec import shipped_spec_path
from search.spec.study_spec import shipped_specs

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "search.cli", *args], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60,
    )  # fmt: skip


def test_the_command_prints_the_schema_and_writes_it(tmp_path: Path) -> None:
    out = _cli("spec", "schema", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == spec_schema()
    written = _cli("spec", "schema", "-o", str(tmp_path / "s.json"), cwd=tmp_path)
    assert written.returncode == 0 and json.loads((tmp_path / "s.json").read_text())
    bad = _cli("spec", "schema", "-o", str(tmp_path / "no" / "dir" / "s.json"), cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


@pytest.mark.parametrize("name", shipped_specs())
def test_shipped_specs_validate(name: str) -> None:
    raw = yaml.safe_load(shipped_spec_path(name).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(spec_schema()).validate(raw)


@pytest.mark.parametrize(
    "change",
    [
        {"sorce": "x"},  # a field that does not exist (a typo)
        {"source": "x"},  # set by the loader, never by a spec
        {"pruner": {"type": "nonsense"}},
    ],
)
def test_what_the_loader_refuses_the_schema_refuses(change: dict[str, object]) -> None:
    raw = yaml.safe_load(shipped_spec_path("ko-retrieval").read_text(encoding="utf-8"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(spec_schema()).validate({**raw, **change})
