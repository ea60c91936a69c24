"""The image runs what the tests ran: the Dockerfile's torch and Python are the tested ones."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert match, f"Dockerfile: no ARG {name}=..."
    return match.group(1)


def test_dockerfile_installs_the_tested_torch() -> None:
    tested = torch.__version__.split("+")[0]  # 2.13.0+cpu here, 2.13.0+cu128 in the image
    assert _arg("TORCH_VERSION") == tested
    # ... and really installs that version, held by a constraint when the project is installed.
    assert 'pip install "torch==${TORCH_VERSION}" --index-url' in DOCKERFILE
    assert 'echo "torch==${TORCH_VERSION}" > /tmp/torch.txt' in DOCKERFILE
    assert "pip install -c /tmp/torch.txt . " in DOCKERFILE  # the dashboard, W&B, plots: deps


def test_dockerfile_base_has_the_tested_python() -> None:
    bases = re.findall(r"^FROM\s+(\S+)", DOCKERFILE, re.MULTILINE)
    assert bases == [f"python:{sys.version_info.major}.{sys.version_info.minor}-slim-bookworm"]


def test_ci_and_readme_pin_the_same_torch() -> None:
    ci = re.findall(r"^TORCH_VERSION=(\S+)$", (ROOT / ".ci/run").read_text(), re.MULTILINE)
    readme = set(re.findall(r"torch==([0-9][0-9.]*[0-9])", (ROOT / "README.md").read_text()))
    assert ci == [_arg("TORCH_VERSION")]
    assert readme == {_arg("TORCH_VERSION")}
