"""What the PNGs (``search.observe.plots``) and the HTML page (``search.observe.plots_html``)
share: colours, labels, file names and section titles.
"""

from __future__ import annotations

from search.observe.install import install_hint
from search.observe.plot_data import CELL_BOTH
from search.observe.plot_data import CELL_FIT
from search.observe.plot_data import CELL_OOM
from search.observe.plot_data import CELL_UNTRIED
from search.observe.plot_data import PlotData

INSTALL_HINT = "(a partial install) " + install_hint()
# tab10 without its red (the OOM kinds' colour) and grey (the frontier's), then tab20's light
# tones: a team's own models beside the four get colours of their own up to 15 models.
MODEL_COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#9edae5",
)
KIND_COLORS = {"real": "#b2182b", "host": "#ef8a62", "predicted": "#7b3294", "frontier": "#999999"}
KIND_LABELS = {
    "real": "real (device memory)",
    "host": "host (RAM)",
    "predicted": "predicted (preflight, not run)",
    "frontier": "frontier (a smaller config ran out; not run)",
}
CELL_COLORS = {
    CELL_UNTRIED: "#eeeeee",
    CELL_FIT: "#a6d96a",
    CELL_BOTH: "#fdae61",
    CELL_OOM: "#d7301f",
}
CELL_ORDER = (CELL_UNTRIED, CELL_FIT, CELL_BOTH, CELL_OOM)
NO_COMPLETE = "no completed trials"

# File name -> what it shows (also the section headings of plots.html).
PNG_FILES = {
    "best_by_model.png": "Best {metric} per model",
    "oom_rate.png": "Share of trials that ran out of memory, per model",
    "memory_vs_metric.png": "{metric} against peak memory, Pareto front marked",
    "history.png": "Optimisation history: {metric} by trial",
    "oom_grid.png": "Which batch size × max_len ran out of memory",
}
OVERVIEW = "overview.png"
HTML = "plots.html"


def model_color(data: PlotData, model: str) -> str:
    """The colour of ``model`` in every plot (PNG and HTML alike)."""
    index = data.models.index(model) if model in data.models else len(data.models)
    return MODEL_COLORS[index % len(MODEL_COLORS)]


GRID_COLS = 4  # OOM grids a row: wider rows cut their titles and run their ticks together


def grid_models(data: PlotData) -> list[str]:
    """The models that have an OOM grid (a trial with a batch size and max_len), in order."""
    return [m for m in data.models if data.grid_axes.get(m, ([], []))[0]]


def grid_shape(n: int) -> tuple[int, int]:
    """Rows and columns of ``n`` models' OOM grids (at most ``GRID_COLS`` a row)."""
    n = max(1, n)
    cols = min(n, GRID_COLS)
    return -(-n // cols), cols
