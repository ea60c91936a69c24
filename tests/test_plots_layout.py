"""The PNGs read right where they used to look broken: no OOM at all (the demo, most runs on a
big GPU), OOMs in every model, a single model, 1,000 trials, and nine models (a team's own
beside the four: distinct colours, OOM grids in rows of four).

Each study is drawn by the product's own code (``figures`` and ``save_png``, what ``search
report --plots`` runs) with warnings as errors, then its layout is measured with matplotlib:
every text lies inside the figure, no title, tick label, axis label or legend sits on
another, the texts drawn on an axes stay inside it (and a grid cell's text inside its cell),
and the per-model bar charts name the models on a categorical axis. The PNGs are kept under
``$SEARCH_TEST_ARTIFACTS/plots`` (else the test's tmp directory) for a person to look at.
"""

from __future__ import annotations

import random
import warnings
from itertools import combinations
from pathlib import Path
from typing import Any

import optuna
import pytest
from _cli import run_search
from _factories import kept_files_dir
from _finished_study import MODELS
from _finished_study import _trial
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.figure import SubFigure
from matplotlib.legend import Legend
from matplotlib.text import Text
from matplotlib.transforms import BboxBase as Bbox

from search.observe.plot_data import PlotData
from search.observe.plot_style import HTML
from search.observe.plot_style import OVERVIEW
from search.observe.plot_style import PNG_FILES
from search.observe.plot_style import model_color
from search.observe.plots import figures
from search.observe.plots import load_plot_data
from search.observe.plots import save_png
from search.record import attrs
from search.spec.load import load_spec
from search.spec.study_spec import shipped_spec_path

Row = tuple[Any, ...]  # _finished_study.TRIALS' layout
BATCHES, LENGTHS = (32, 64, 128), (128, 256)
KINDS = ("real", "host", "predicted", "frontier")


def _complete(rng: random.Random, model: str) -> Row:
    value, gib = rng.uniform(0.40, 0.80), rng.uniform(1.0, 12.0)
    return (model, "complete", rng.choice(BATCHES), rng.choice(LENGTHS), value, gib, None, None)


def _oom(rng: random.Random, model: str) -> Row:
    return (model, "oom", 256, 512, None, None, rng.choice(KINDS), None)


def _rows(case: str) -> tuple[list[str], list[Row]]:
    """The models and trials of each study."""
    rng = random.Random(case)
    if case == "no_oom":  # what the demo gives: three completed trials per model
        return MODELS, [_complete(rng, MODELS[i % 4]) for i in range(12)]
    if case == "oom_in_every_model":  # every kind; the last model never fits
        ooms = [(m, "oom", 256, 512, None, None, KINDS[i], None) for i, m in enumerate(MODELS)]
        done = [_complete(rng, m) for m in MODELS[:3] for _ in range(2)]
        return MODELS, ooms + done + [_oom(rng, MODELS[3]) for _ in range(3)]
    if case == "single_model":
        model = "bge-m3-ko"
        return [model], [_complete(rng, model) for _ in range(5)] + [_oom(rng, model)]
    if case == "many_models":  # a team's own models beside the four: nine, long names
        models = [*MODELS, *EXTRA_MODELS]
        rows = [_complete(rng, models[i % len(models)]) for i in range(36)]
        return models, rows + [_oom(rng, m) for m in models[::2]]
    assert case == "thousand_trials"
    rows = [(_oom if rng.random() < 0.2 else _complete)(rng, MODELS[i % 4]) for i in range(1000)]
    return MODELS, rows


CASES = ("no_oom", "oom_in_every_model", "single_model", "thousand_trials", "many_models")
EXTRA_MODELS = [
    "klue-roberta-large-sts",
    "kor-bge-m3-ft-2026-11",
    "e5-large-v2-ko-distilled",
    "minilm-l6-ko-in-house",
    "gte-multilingual-base",
]


def _study(case: str, storage: str | None = None) -> optuna.Study:
    """An in-memory (or ``storage``) study as the service leaves it: spec attribute, trials."""
    models, rows = _rows(case)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=case, direction="maximize")
    spec = load_spec(shipped_spec_path("ko-retrieval")).public_dict()
    declared = {m: {"path": f"/models/{m}"} for m in EXTRA_MODELS}  # the team's own
    spec["models"] = {m: spec["models"].get(m) or declared[m] for m in models}
    study.set_user_attr(attrs.STUDY_SPEC, spec)
    study.add_trials([_trial(number, row, models) for number, row in enumerate(rows)])
    return study


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the PNGs are kept: ``$SEARCH_TEST_ARTIFACTS/plots`` or a tmp dir."""
    return kept_files_dir(tmp_path_factory, "plots")


def _inside(inner: Bbox, outer: Bbox, slack: float = 1.0) -> bool:
    return (
        inner.x0 >= outer.x0 - slack
        and inner.y0 >= outer.y0 - slack
        and inner.x1 <= outer.x1 + slack
        and inner.y1 <= outer.y1 + slack
    )


def _overlap(a: Bbox, b: Bbox, slack: float = 1.0) -> bool:
    """More than ``slack`` pixels of ``a`` and ``b`` cover each other (touching is fine)."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > slack and min(a.y1, b.y1) - max(a.y0, b.y0) > slack


def _shown(texts: Any) -> list[Text]:
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _ticks(labels: list[Text], limits: tuple[float, float], i: int) -> list[Text]:
    """The tick labels matplotlib draws: those of ticks within the axis' view."""
    low, high = sorted(limits)
    return [t for t in labels if low - 1e-9 <= t.get_position()[i] <= high + 1e-9]


def _labels(fig: Figure) -> dict[str, Bbox]:
    """Every title, axis label, tick label and legend of ``fig``, by a name that says which."""
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    boxes: dict[str, Bbox] = {}
    for part in fig.findobj(lambda a: isinstance(a, Figure | SubFigure)):
        for text in _shown(getattr(part, "texts", [])):  # suptitles
            boxes[f"title {text.get_text()!r}"] = text.get_window_extent(renderer)
    for i, ax in enumerate(fig.findobj(Axes)):
        named = [("axes title", ax.title), ("x label", ax.xaxis.label),
                 ("y label", ax.yaxis.label)]  # fmt: skip
        named += [("x tick", t) for t in _ticks(ax.get_xticklabels(), ax.get_xlim(), 0)]
        named += [("y tick", t) for t in _ticks(ax.get_yticklabels(), ax.get_ylim(), 1)]
        for kind, text in named:
            if text in _shown([text]):
                boxes[f"axes {i} {kind} {text.get_text()!r}"] = text.get_window_extent(renderer)
    for i, legend in enumerate(fig.findobj(Legend)):
        boxes[f"legend {i}"] = legend.get_window_extent(renderer)
    return boxes


def _check_layout(name: str, fig: Figure, data: PlotData) -> None:
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    labels = _labels(fig)
    assert any(key.startswith("title") for key in labels), name
    cut = [key for key, box in labels.items() if not _inside(box, fig.bbox)]
    assert not cut, f"{name}: cut at the figure's edge: {cut}"
    on_top = [(a, b) for (a, ba), (b, bb) in combinations(labels.items(), 2) if _overlap(ba, bb)]
    assert not on_top, f"{name}: drawn over each other: {on_top}"
    for ax in fig.findobj(Axes):
        frame = ax.get_window_extent(renderer)
        texts = [(t.get_text(), t.get_window_extent(renderer)) for t in _shown(ax.texts)]
        out = [text for text, box in texts if not _inside(box, frame)]
        assert not out, f"{name}: outside the axes {ax.get_title()!r}: {out}"
        on_top = [(a, b) for (a, ba), (b, bb) in combinations(texts, 2) if _overlap(ba, bb)]
        assert not on_top, f"{name}: texts over each other in {ax.get_title()!r}: {on_top}"
        if ax.images:  # an OOM grid: each cell's text fits its cell
            n_cols = ax.images[0].get_array().shape[1]  # type: ignore[union-attr]
            wide = [text for text, box in texts if box.width > frame.width / n_cols]
            assert not wide, f"{name}: wider than a cell of {ax.get_title()!r}: {wide}"
    # The per-model bar charts: one named row per model, the spec's first model on top.
    rows = list(reversed(data.models))
    named = [a for a in fig.findobj(Axes) if [t.get_text() for t in a.get_yticklabels()] == rows]
    expected = {"best_by_model.png": 1, "oom_rate.png": 1, OVERVIEW: 2}.get(name, 0)
    assert len(named) >= expected, f"{name}: no y axis names the models {rows}"


@pytest.mark.parametrize("case", CASES)
def test_plots_read_right(case: str, artifacts: Path) -> None:
    data = load_plot_data(_study(case))
    colors = [model_color(data, m) for m in data.models]
    assert len(set(colors)) == len(colors), "two models share a colour"
    out = artifacts / case
    out.mkdir(exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "constrained_layout not applied" fails the test
        figs = figures(data)
        assert list(figs) == [*PNG_FILES, OVERVIEW]
        for name, fig in figs.items():
            save_png(fig, out / name)  # draws it: the layout below is the PNG's
            _check_layout(name, fig, data)


def test_oom_rate_without_any_oom_names_every_model(artifacts: Path) -> None:
    """The demo's case, as the texts say it: one ``0 of 3 trials`` per model, and why."""
    data = load_plot_data(_study("no_oom"))
    fig = figures(data)["oom_rate.png"]
    save_png(fig, artifacts / "no_oom_rate.png")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == list(reversed(MODELS))
    texts = [t.get_text().strip() for t in ax.texts]
    assert texts.count("0 of 3 trials") == 4 and "no trial ran out of memory" in texts
    assert not ax.patches  # no bar of zero width


def test_report_plots_without_oom_warns_nothing(tmp_path: Path) -> None:
    """``search report --plots`` on the demo's case, warnings as errors: no warning, all files."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    _study("no_oom", storage=url)
    out = tmp_path / "plots"
    result = run_search(
        "report", "--study", "no_oom", "--storage", url, "--plots", str(out), cwd=tmp_path,
        python_flags=("-W", "error::UserWarning"), timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert sorted(p.name for p in out.iterdir()) == sorted([*PNG_FILES, OVERVIEW, HTML])


def test_history_shows_the_ooms_before_the_first_completed_trial() -> None:
    data = load_plot_data(_study("oom_in_every_model"))  # trials 0-3 ran out of memory
    (ax,) = figures(data)["history.png"].axes
    low, high = ax.get_xlim()
    assert low < 0 and high > len(data.points) - 1


def test_html_grids_wrap_like_the_png() -> None:
    """plots.html lays nine models' OOM grids out as the PNG does: rows of four, not one row."""
    from search.observe.plots_html import grid_figure

    fig = grid_figure(load_plot_data(_study("many_models")))
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == 9
    rows = {tuple(fig.layout[t.yaxis.replace("y", "yaxis", 1)].domain) for t in heatmaps}
    cols = {tuple(fig.layout[t.xaxis.replace("x", "xaxis", 1)].domain) for t in heatmaps}
    assert len(rows) == 3 and len(cols) == 4
    assert fig.layout.height == 3 * 460
