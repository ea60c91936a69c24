"""``search report --plots DIR``: PNGs and one offline HTML page that tell the search."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from _cli import run_search
from _finished_study import BEST
from _finished_study import MODELS
from _finished_study import finished_study
from PIL import Image

from search.observe.plot_data import CELL_BOTH
from search.observe.plot_data import CELL_FIT
from search.observe.plot_data import CELL_OOM
from search.observe.plot_data import CELL_UNTRIED
from search.observe.plot_data import TrialPoint
from search.observe.plot_data import oom_grid
from search.observe.plot_data import pareto_front
from search.observe.plot_style import HTML
from search.observe.plot_style import INSTALL_HINT
from search.observe.plot_style import KIND_LABELS
from search.observe.plot_style import OVERVIEW
from search.observe.plot_style import PNG_FILES
from search.observe.plots import load_plot_data
from search.observe.plots import write_plots
from search.record import attrs
from storage import create_storage

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path, pythonpath: str = str(ROOT)) -> subprocess.CompletedProcess[str]:
    return run_search(*args, cwd=cwd, env={"PYTHONPATH": pythonpath}, timeout=120)


def _check_pngs(out: Path) -> None:
    for name in [*PNG_FILES, OVERVIEW]:
        path = out / name
        assert path.stat().st_size > 2_000, name  # 128-colour PNGs: 3 KB for a text-only one
        with Image.open(path) as image:
            image.load()  # decodes the whole file
            width, height = image.size
        assert 500 <= width <= 2000 and 250 <= height <= 2000, (name, image.size)


def test_report_plots_via_the_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    finished_study(url, "s")
    out = tmp_path / "plots"
    result = run_search(
        "report", "--study", "s", "--storage", url, "--plots", str(out), cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT)}, timeout=120, python_flags=("-W", "error::UserWarning"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no layout warning either
    assert f"7 plots in {out}" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([*PNG_FILES, OVERVIEW, HTML])
    _check_pngs(out)
    page = (out / HTML).read_text(encoding="utf-8")
    names = set(re.findall(r'"name":"([^"]+)"', page))
    assert set(MODELS) <= names  # one trace per model
    assert {"Pareto front", "best so far", *(KIND_LABELS[k] for k in attrs.OOM_KINDS)} <= names
    assert "nDCG@10" in page and "peak memory of the trial (GiB)" in page
    assert f"best: trial {BEST}, bge-m3-ko, nDCG@10 0.7900" in page
    assert page.count("plotly.js v") == 1  # inlined once: it works offline
    assert not re.search(r"<script[^>]+src=", page)  # and loads no script from anywhere
    # The report itself is printed too, at 100 columns.
    lines = result.stdout.splitlines()[:-1]  # the last one says where the plots are
    assert lines[0].startswith(f"best: trial {BEST}, bge-m3-ko, nDCG@10 0.7900")
    assert max(len(line) for line in lines) <= 100
    # With --json, stdout stays one JSON object; where the plots are goes to stderr.
    again = _cli("report", "--study", "s", "--storage", url, "--json", "--plots", str(out),
                 cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["best"]["trial"] == BEST
    assert f"7 plots in {out}" in again.stderr


def test_plots_of_a_study_without_completed_trials(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = finished_study(url, "none", completed=False)
    written = write_plots(study, tmp_path / "out")
    assert len(written) == 7
    _check_pngs(tmp_path / "out")
    page = (tmp_path / "out" / HTML).read_text(encoding="utf-8")
    assert page.count("no completed trials") >= 3  # best, memory, history say so
    assert "Pareto front" not in re.findall(r'"name":"([^"]+)"', page)


def test_lean_read_gives_the_same_plot_data(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = finished_study(url, "s")
    store = create_storage(url, heartbeat_interval=None)
    assert load_plot_data(study, storage=store) == load_plot_data(study)


def test_without_matplotlib_the_cli_says_what_to_install(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    finished_study(url, "s")
    blocked = tmp_path / "blocked" / "matplotlib"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'matplotlib'\", name='matplotlib')\n"
    )
    out = tmp_path / "plots"
    result = _cli(
        "report", "--study", "s", "--storage", url, "--plots", str(out), cwd=tmp_path,
        pythonpath=os.pathsep.join([str(blocked.parent), str(ROOT)]),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert INSTALL_HINT in result.stderr and "matplotlib is missing" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == "" and not out.exists()


def test_plots_dir_that_is_a_file_is_exit_2(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    finished_study(url, "s")
    (tmp_path / "taken").write_text("x")
    result = _cli("report", "--study", "s", "--storage", url, "--plots", "taken", cwd=tmp_path)
    assert result.returncode == 2
    assert "--plots taken: exists and is not a directory" in result.stderr
    assert result.stdout == ""


def _p(number: int, value: float, gib: float) -> TrialPoint:
    return TrialPoint(number, "m", "complete", value, gib * 1024)


@pytest.mark.parametrize("maximize", [True, False])
def test_pareto_front_keeps_what_nothing_beats(maximize: bool) -> None:
    points = [_p(0, 0.5, 2), _p(1, 0.7, 4), _p(2, 0.6, 8), _p(3, 0.7, 3), _p(4, 0.4, 1)]
    front = [p.number for p in pareto_front(points, maximize=maximize)]
    # Maximize: more score for more memory. Minimize: only the cheapest-and-lowest survives.
    assert front == ([4, 0, 3] if maximize else [4])


def test_oom_grid_tells_fit_oom_both_and_untried(tmp_path: Path) -> None:
    study = finished_study(f"sqlite:///{tmp_path / 'study.db'}", "s")
    data = load_plot_data(study)
    assert data.grid_axes["bge-m3-ko"] == ([32, 64], [256, 384])  # the spec's condition
    cells = {(c.batch_size, c.max_len): c for row in oom_grid(data, "bge-m3-ko") for c in row}
    assert cells[64, 384].state == CELL_OOM and cells[64, 384].kinds == ("real", "frontier")
    assert cells[32, 256].state == CELL_FIT and cells[32, 256].fit == 2
    simcse = {c.batch_size: c for row in oom_grid(data, "ko-simcse") for c in row}
    assert simcse[256].state == CELL_OOM and simcse[256].label == "1 OOM (host)"
    assert simcse[64].state == CELL_UNTRIED and simcse[64].label == "1 failed"
    assert CELL_BOTH not in {c.state for c in cells.values()}
