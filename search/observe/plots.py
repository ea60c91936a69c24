"""Pictures of a study: PNGs (matplotlib, Agg) and one self-contained HTML page (plotly).

``write_plots(study, out_dir)`` writes, for ``search report --plots DIR`` and the dashboard's
artifacts: the best score per model, the OOM rate per model, peak memory against the score with
the Pareto front, the optimisation history, and the batch x max_len grid of what ran out of
memory, each as a PNG, all of them in ``overview.png`` and in ``plots.html``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from search.observe.plot_data import OOM
from search.observe.plot_data import PRUNED
from search.observe.plot_data import GridCell
from search.observe.plot_data import PlotData
from search.observe.plot_data import TrialPoint
from search.observe.plot_data import best_so_far
from search.observe.plot_data import history_xy
from search.observe.plot_data import memory_xy
from search.observe.plot_data import oom_grid
from search.observe.plot_data import oom_rate
from search.observe.plot_data import pareto_front
from search.observe.plot_data import plot_data
from search.observe.plot_style import CELL_COLORS
from search.observe.plot_style import CELL_ORDER
from search.observe.plot_style import HTML
from search.observe.plot_style import INSTALL_HINT
from search.observe.plot_style import KIND_COLORS
from search.observe.plot_style import KIND_LABELS
from search.observe.plot_style import NO_COMPLETE
from search.observe.plot_style import OVERVIEW
from search.observe.plot_style import PNG_FILES
from search.observe.plot_style import grid_models
from search.observe.plot_style import grid_shape
from search.observe.plot_style import model_color
from search.observe.plots_html import write_html
from search.observe.report import read_trials
from search.observe.report import study_metric
from search.record import attrs
from search.record.counts import requeued_numbers
from search.record.stored_spec import stored_spec_of

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure
    from matplotlib.figure import SubFigure

DPI = 80  # of the figures and their PNGs: a layout checked on the figure is the PNG's


class PlotsUnavailableError(ImportError):
    """matplotlib or plotly is missing: the message says how to install them."""


def require_plot_libs() -> None:
    """Raise PlotsUnavailableError (one line with the pip command) without the plot libraries."""
    try:
        import matplotlib  # noqa: F401
        import plotly  # noqa: F401
    except ImportError as exc:
        raise PlotsUnavailableError(
            f"--plots needs matplotlib and plotly ({exc.name} is missing): {INSTALL_HINT}"
        ) from exc


def load_plot_data(
    study: optuna.Study, *, storage: optuna.storages.BaseStorage | None = None
) -> PlotData:
    """The plot data of ``study`` (a lean read of the RDB ``storage`` when given)."""
    trials = read_trials(study, storage=storage)
    spec = stored_spec_of(study)
    return plot_data(
        trials,
        study=study.study_name,
        metric=study_metric(study),
        maximize=study.direction.name == "MAXIMIZE",
        spec=spec if isinstance(spec, dict) else None,
        skip=frozenset(requeued_numbers(trials)),
    )


def write_plots(
    study: optuna.Study | PlotData,
    out_dir: str | Path,
    *,
    storage: optuna.storages.BaseStorage | None = None,
) -> list[Path]:
    """Write the PNGs, ``overview.png`` and ``plots.html`` into ``out_dir``; return their paths.

    Raises PlotsUnavailableError when matplotlib or plotly is not installed.
    """
    require_plot_libs()
    data = study if isinstance(study, PlotData) else load_plot_data(study, storage=storage)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [save_png(fig, out / name) for name, fig in figures(data).items()]
    written.append(write_html(data, out / HTML))
    return written


def figures(data: PlotData) -> dict[str, Figure]:
    """Every PNG's figure, by file name (the five plots, then ``overview.png``), not drawn yet."""
    figs = {}
    rows = _grid_shape(data)[0]
    for name, draw in zip(PNG_FILES, _DRAWERS, strict=True):
        width, height = _SIZES[name]
        if name == "oom_grid.png":  # one row of grids per GRID_COLS models (plot_style)
            height *= rows
        figs[name] = _figure(width, height)
        draw(figs[name], data)
    figs[OVERVIEW] = overview_figure(data)
    return figs


def overview_figure(data: PlotData) -> Figure:
    """All five plots on one page."""
    rows = _grid_shape(data)[0]
    fig = _figure(16, 17 + _SIZES["oom_grid.png"][1] * (rows - 1))
    fig.suptitle(
        f"study {data.study}: {len(data.points)} trials, {len(data.complete())} completed",
        fontsize=15,
        fontweight="bold",
    )
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=[0.9, 1.25, 1.0 * rows])  # type: ignore[misc]
    upper = top.subfigures(1, 2)
    _best_by_model(upper[0], data)
    _oom_rate(upper[1], data)
    lower = middle.subfigures(1, 2)
    _memory_vs_metric(lower[0], data)
    _history(lower[1], data)
    _oom_grids(bottom, data)
    return fig


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Save as a 128-colour PNG: flat plot colours survive, the file is a third the size."""
    from PIL import Image  # a dependency of matplotlib

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    buffer.seek(0)
    with Image.open(buffer) as image:
        flat = image.convert("RGB").quantize(
            colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
        flat.save(path, optimize=True)
    return path


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=14, color="#666666",
            transform=ax.transAxes)  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])


def _title(fig: Figure | SubFigure, name: str, data: PlotData) -> None:
    fig.suptitle(PNG_FILES[name].format(metric=data.metric), fontsize=13, fontweight="bold")


def _best_by_model(fig: Figure | SubFigure, data: PlotData) -> None:
    _title(fig, "best_by_model.png", data)
    ax = fig.subplots()
    if not data.complete():
        _empty(ax, NO_COMPLETE)
        return
    models = list(reversed(data.models))  # first model on top
    best = {m: data.best(m) for m in models}
    values = [b.value if b and b.value is not None else 0.0 for b in best.values()]
    _model_axis(ax, models)
    ax.barh(range(len(models)), values, color=[model_color(data, m) for m in models])
    top = max(values) or 1.0
    for y, model in enumerate(models):
        b = best[model]
        if b is None or b.value is None:
            x, text = 0.0, "no completed trial"
        else:
            x, text = b.value, f"{b.value:.4f}\ntrial {b.number}, {b.shape}"
        ax.annotate(text, (x, y), xytext=(4, 0), textcoords="offset points", va="center",
                    fontsize=10)  # fmt: skip
    ax.set_xlim(0, top * 1.6)
    ax.set_xlabel(f"best {data.metric} of the model's completed trials (higher is better)"
                  if data.maximize else f"best {data.metric} (lower is better)")  # fmt: skip
    ax.grid(axis="x", alpha=0.3)


def _oom_rate(fig: Figure | SubFigure, data: PlotData) -> None:
    from matplotlib.ticker import PercentFormatter

    _title(fig, "oom_rate.png", data)
    ax = fig.subplots()
    if not data.points:
        _empty(ax, "no trials")
        return
    models = list(reversed(data.models))
    _model_axis(ax, models)
    rates = {m: oom_rate(data, m) for m in models}
    left = [0.0] * len(models)
    for kind in attrs.OOM_KINDS:
        widths = [rates[m][kind] for m in models]
        if any(widths):
            ax.barh(
                range(len(models)),
                widths,
                left=left,
                color=KIND_COLORS[kind],
                label=KIND_LABELS[kind],
            )
            left = [a + b for a, b in zip(left, widths, strict=True)]
    for y, model in enumerate(models):
        done = [p for p in data.of_model(model) if p.outcome != "running"]
        n_oom = sum(p.outcome == OOM for p in done)
        ax.text(left[y], y, f" {n_oom} of {len(done)} trials", va="center", fontsize=10)
    ax.set_xlim(0, 1.3)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    if not any(left):
        ax.text(0.6, 0.5, "no trial ran out of memory", ha="center", va="center", fontsize=12,
                color="#666666", transform=ax.transAxes)  # fmt: skip
    ax.set_xlabel("share of the model's trials that ran out of memory or were skipped for it")
    if any(left):  # below the axes: bars of 100% would hide under a legend inside
        fig.legend(loc="outside lower center", ncols=2, fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def _model_axis(ax: Any, models: list[str]) -> None:
    """One row per model, named, even where every bar has zero width (no OOM at all)."""
    ax.set_yticks(range(len(models)), models)
    ax.set_ylim(-0.6, len(models) - 0.4)


def _memory_vs_metric(fig: Figure | SubFigure, data: PlotData) -> None:
    _title(fig, "memory_vs_metric.png", data)
    ax = fig.subplots()
    done = [p for p in data.complete() if p.peak_gib is not None]
    if not done:
        _empty(ax, NO_COMPLETE)
        return
    for model in data.models:
        pts = [p for p in done if p.model == model]
        if pts:
            ax.scatter(*memory_xy(pts), s=45, alpha=0.8, color=model_color(data, model),
                       label=model)  # fmt: skip
    front = pareto_front(done, maximize=data.maximize)
    xs, ys = memory_xy(front)
    ax.step(xs, ys, where="post", color="black", linewidth=1.2, alpha=0.7)
    ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="black", linewidths=1.5,
               label="Pareto front")  # fmt: skip
    _number_front(ax, front, xs, ys)
    ax.set_xlabel("peak memory of the trial (GiB; lower is cheaper)")
    ax.set_ylabel(f"{data.metric} (final epoch)")
    _legend_below(fig, ax)
    ax.grid(alpha=0.3)


def _number_front(ax: Any, front: list[TrialPoint], xs: list[float], ys: list[float]) -> None:
    """``#12`` beside each Pareto point, inside the axes; a label that would sit on an earlier
    one is left out (its circle stays)."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    placed: list[tuple[float, float]] = []
    for p, x, y in zip(front, xs, ys, strict=True):
        fx, fy = (x - x0) / ((x1 - x0) or 1.0), (y - y0) / ((y1 - y0) or 1.0)
        if any(abs(fx - px) < 0.09 and abs(fy - py) < 0.06 for px, py in placed):
            continue
        placed.append((fx, fy))
        right, low = fx > 0.85, fy < 0.15  # near an edge: label on the inner side
        ax.annotate(f"#{p.number}", (x, y), xytext=(-7 if right else 7, 6 if low else -6),
                    textcoords="offset points", ha="right" if right else "left",
                    va="bottom" if low else "top", fontsize=8)  # fmt: skip


def _legend_below(fig: Figure | SubFigure, ax: Any) -> None:
    """The axes' legend under it: with hundreds of trials no corner inside is free."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)),
               fontsize=9)  # fmt: skip


def _history(fig: Figure | SubFigure, data: PlotData) -> None:
    _title(fig, "history.png", data)
    ax = fig.subplots()
    done = data.complete()
    if not done:
        _empty(ax, NO_COMPLETE)
        return
    for model in data.models:
        pts = [p for p in done if p.model == model]
        if pts:
            ax.scatter(*history_xy(pts), s=35, color=model_color(data, model), label=model)
    xs, ys = best_so_far(data)
    last = max(p.number for p in data.points)
    ax.step([*xs, last], [*ys, ys[-1]], where="post", color="black", linewidth=1.2,
            label="best so far")  # fmt: skip
    low, high = ax.get_ylim()
    ax.set_ylim(low - 0.15 * (high - low), high)  # room for the OOM / pruned marks below
    trans = ax.get_xaxis_transform()
    for outcome, y, color, label in ((OOM, 0.03, KIND_COLORS["real"], "OOM"),
                                     (PRUNED, 0.08, "#777777", "pruned")):  # fmt: skip
        nums = [p.number for p in data.points if p.outcome == outcome]
        if nums:
            ax.scatter(nums, [y] * len(nums), marker="|", s=120, color=color, transform=trans,
                       label=f"{label} (no score)")  # fmt: skip
    first = min(p.number for p in data.points)  # an OOM before any completed trial shows too
    pad = max(0.5, 0.02 * (last - first))
    ax.set_xlim(first - pad, last + pad)
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"{data.metric} of completed trials")
    _legend_below(fig, ax)
    ax.grid(alpha=0.3)


def _oom_grids(fig: Figure | SubFigure, data: PlotData) -> None:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    _title(fig, "oom_grid.png", data)
    models = grid_models(data)
    if not models:
        _empty(fig.subplots(), "no trials with a batch size and max_len")
        return
    n_rows, n_cols = _grid_shape(data)
    axes = list(fig.subplots(n_rows, n_cols, squeeze=False).ravel())
    for spare in axes[len(models) :]:  # the last row's empty places
        spare.remove()
    cmap = ListedColormap([CELL_COLORS[c] for c in CELL_ORDER])
    for ax, model in zip(axes, models, strict=False):
        rows = oom_grid(data, model)
        batches, lengths = data.grid_axes[model]
        codes = [[CELL_ORDER.index(c.state) for c in row] for row in rows]
        ax.imshow(codes, cmap=cmap, vmin=0, vmax=len(CELL_ORDER) - 1, origin="lower",
                  aspect="auto")  # fmt: skip
        for y, row in enumerate(rows):
            for x, cell in enumerate(row):
                ax.text(x, y, _cell_text(cell), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(batches)), [str(b) for b in batches])
        ax.set_xlabel("max_len (tokens)")
        ax.set_ylabel("batch size")
        ax.set_title(model, color=model_color(data, model), fontweight="bold")
    fig.legend(handles=[Patch(color=CELL_COLORS[c], label=c) for c in CELL_ORDER],
               loc="outside lower center", ncols=len(CELL_ORDER), fontsize=10)  # fmt: skip


def _grid_shape(data: PlotData) -> tuple[int, int]:
    """Rows and columns of the OOM grids of the models that have one."""
    return grid_shape(len(grid_models(data)))


def _cell_text(cell: GridCell) -> str:
    """A grid cell's label on short lines: ``52 OOM`` then its kinds, one a line."""
    kinds = list(cell.kinds) if len(cell.kinds) > 1 else [f"({k})" for k in cell.kinds]
    lines = [f"{cell.fit} ok"] if cell.fit else []
    lines += [f"{cell.oom} OOM", *kinds] if cell.oom else []
    lines += [f"{cell.failed} failed"] if cell.failed else []
    return "\n".join(lines) or "-"


_DRAWERS = (_best_by_model, _oom_rate, _memory_vs_metric, _history, _oom_grids)
_SIZES = {
    "best_by_model.png": (9, 4.5),
    "oom_rate.png": (9, 4.5),
    "memory_vs_metric.png": (9, 6.5),
    "history.png": (9, 6),
    "oom_grid.png": (16, 5),
}
