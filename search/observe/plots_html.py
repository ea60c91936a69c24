"""The plots of a study as one self-contained HTML page (plotly, its JavaScript inlined).

The page works offline: plotly.js is embedded once, no script is loaded from the network.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from search.observe.plot_data import OOM
from search.observe.plot_data import PRUNED
from search.observe.plot_data import RUNNING
from search.observe.plot_data import PlotData
from search.observe.plot_data import TrialPoint
from search.observe.plot_data import best_so_far
from search.observe.plot_data import oom_grid
from search.observe.plot_data import oom_rate
from search.observe.plot_data import pareto_front
from search.observe.plot_style import CELL_COLORS
from search.observe.plot_style import CELL_ORDER
from search.observe.plot_style import KIND_COLORS
from search.observe.plot_style import KIND_LABELS
from search.observe.plot_style import NO_COMPLETE
from search.observe.plot_style import PNG_FILES
from search.observe.plot_style import grid_models
from search.observe.plot_style import grid_shape
from search.observe.plot_style import model_color
from search.record import attrs

if TYPE_CHECKING:
    import plotly.graph_objects as go

PARETO_TRACE = "Pareto front"
BEST_SO_FAR_TRACE = "best so far"

_INTRO = {
    "best_by_model.png": "The best completed trial of each model: the winner is the longest bar.",
    "oom_rate.png": "How often each model ran out of memory (or was skipped because a config "
    "like it had), split by kind: real (device), host (RAM), predicted (preflight estimate), "
    "frontier (a smaller config had already run out).",
    "memory_vs_metric.png": "Every completed trial: what its score cost in memory. The Pareto "
    "front joins the trials no other beats on both (higher score, less memory).",
    "history.png": "Completed trials in the order they ran, the best score so far, and the "
    "trials that ended without a score (OOM, pruned) along the bottom.",
    "oom_grid.png": "For each model, every batch size × max_len it may take: which fit, which "
    "ran out of memory, which were never tried. Hover a cell for its trials.",
}


def _hover(p: TrialPoint, metric: str) -> str:
    score = "" if p.value is None else f"<br>{metric} {p.value:.4f}"
    memory = "" if p.peak_gib is None else f"<br>peak {p.peak_gib:.2f} GiB"
    return f"trial {p.number} {p.model}<br>{p.shape}{score}{memory}"


def _layout(fig: go.Figure, title: str, height: int = 450) -> go.Figure:
    fig.update_layout(
        title={"text": title},
        height=height,
        template="plotly_white",
        margin={"l": 70, "r": 30, "t": 60, "b": 60},
    )
    return fig


def _no_data(fig: go.Figure, text: str) -> go.Figure:
    fig.add_annotation(text=text, showarrow=False, font={"size": 18, "color": "#666666"},
                       xref="paper", yref="paper", x=0.5, y=0.5)  # fmt: skip
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def best_figure(data: PlotData) -> go.Figure:
    """Best score per model, one bar trace per model."""
    import plotly.graph_objects as go

    fig = go.Figure()
    if not data.complete():
        _no_data(fig, NO_COMPLETE)
    for model in data.models:
        best = data.best(model)
        if best is None or best.value is None:
            continue
        fig.add_trace(go.Bar(x=[best.value], y=[model], orientation="h", name=model,
                             marker_color=model_color(data, model),
                             text=[f"{best.value:.4f} (trial {best.number}, {best.shape})"],
                             textposition="outside", hovertext=[_hover(best, data.metric)],
                             hoverinfo="text"))  # fmt: skip
    top = max((p.value or 0.0 for p in data.complete()), default=1.0) or 1.0
    fig.update_xaxes(title={"text": f"best {data.metric} of the model's completed trials"},
                     range=[0, top * 1.5])  # fmt: skip
    fig.update_yaxes(categoryorder="array", categoryarray=list(reversed(data.models)))
    return _layout(fig, PNG_FILES["best_by_model.png"].format(metric=data.metric), 380)


def oom_rate_figure(data: PlotData) -> go.Figure:
    """OOM share per model, stacked by kind."""
    import plotly.graph_objects as go

    fig = go.Figure()
    if not data.points:
        _no_data(fig, "no trials")
    models = data.models
    rates = {m: oom_rate(data, m) for m in models}
    for kind in attrs.OOM_KINDS:
        xs = [rates[m][kind] for m in models]
        if any(xs):
            fig.add_trace(go.Bar(x=xs, y=models, orientation="h", name=KIND_LABELS[kind],
                                 marker_color=KIND_COLORS[kind],
                                 hovertemplate="%{y}: %{x:.0%} OOM " + kind))  # fmt: skip
    counts = []
    for m in models:
        done = [p for p in data.of_model(m) if p.outcome != RUNNING]
        counts.append(f"{sum(p.outcome == OOM for p in done)} of {len(done)} trials")
    # A little right of the bar's end: at 0 the count would touch the model's name.
    ends = [sum(rates[m].values()) + 0.01 for m in models]
    fig.add_trace(go.Scatter(x=ends, y=models, mode="text", text=counts,
                             textposition="middle right", showlegend=False,
                             hoverinfo="skip"))  # fmt: skip
    fig.update_layout(barmode="stack")
    fig.update_xaxes(title={"text": "share of the model's trials that ran out of memory"},
                     tickformat=".0%", range=[0, 1.3])  # fmt: skip
    fig.update_yaxes(categoryorder="array", categoryarray=list(reversed(models)))
    return _layout(fig, PNG_FILES["oom_rate.png"], 380)


def _model_markers(
    fig: go.Figure,
    data: PlotData,
    points: list[TrialPoint],
    x: Callable[[TrialPoint], float | None],
    *,
    size: int,
) -> None:
    """One marker trace per model (its colour, hover text with the trial's config)."""
    import plotly.graph_objects as go

    for model in data.models:
        pts = [p for p in points if p.model == model]
        if pts:
            fig.add_trace(go.Scatter(x=[x(p) for p in pts], y=[p.value for p in pts],
                                     mode="markers", name=model,
                                     marker={"color": model_color(data, model), "size": size},
                                     hovertext=[_hover(p, data.metric) for p in pts],
                                     hoverinfo="text"))  # fmt: skip


def memory_figure(data: PlotData) -> go.Figure:
    """Score against peak memory, one trace per model, and the Pareto front."""
    import plotly.graph_objects as go

    fig = go.Figure()
    done = [p for p in data.complete() if p.peak_gib is not None]
    if not done:
        _no_data(fig, NO_COMPLETE)
    _model_markers(fig, data, done, lambda p: p.peak_gib, size=10)
    front = pareto_front(done, maximize=data.maximize)
    if front:
        fig.add_trace(go.Scatter(x=[p.peak_gib for p in front], y=[p.value for p in front],
                                 mode="lines+markers", name=PARETO_TRACE,
                                 line={"shape": "hv", "color": "black", "width": 1.5},
                                 marker={"symbol": "circle-open", "size": 16,
                                         "color": "black", "line": {"width": 2}},
                                 hovertext=[_hover(p, data.metric) for p in front],
                                 hoverinfo="text"))  # fmt: skip
    fig.update_xaxes(title={"text": "peak memory of the trial (GiB)"})
    fig.update_yaxes(title={"text": f"{data.metric} (final epoch)"})
    title = PNG_FILES["memory_vs_metric.png"].format(metric=data.metric)
    return _layout(fig, title, 520)


def history_figure(data: PlotData) -> go.Figure:
    """Completed trials by number per model, the best so far, OOM and pruned trials."""
    import plotly.graph_objects as go

    fig = go.Figure()
    done = sorted(data.complete(), key=lambda p: p.number)
    if not done:
        _no_data(fig, NO_COMPLETE)
    _model_markers(fig, data, done, lambda p: p.number, size=9)
    if done:
        xs, ys = best_so_far(data)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=BEST_SO_FAR_TRACE,
                                 line={"shape": "hv", "color": "black"}))  # fmt: skip
        low = min(p.value for p in done if p.value is not None)
        for outcome, color, label in ((OOM, KIND_COLORS["real"], "OOM (no score)"),
                                      (PRUNED, "#777777", "pruned (no score)")):  # fmt: skip
            pts = [p for p in data.points if p.outcome == outcome]
            if pts:
                fig.add_trace(go.Scatter(x=[p.number for p in pts], y=[low] * len(pts),
                                         mode="markers", name=label,
                                         marker={"symbol": "line-ns-open", "size": 14,
                                                 "color": color},
                                         hovertext=[_hover(p, data.metric) for p in pts],
                                         hoverinfo="text"))  # fmt: skip
    fig.update_xaxes(title={"text": "trial number"})
    fig.update_yaxes(title={"text": f"{data.metric} of completed trials"})
    return _layout(fig, PNG_FILES["history.png"].format(metric=data.metric), 480)


def _cell_text(label: str) -> str:
    return label.replace(", ", "<br>").replace(" (", "<br>(")


def grid_figure(data: PlotData) -> go.Figure:
    """Per model, a batch size x max_len heatmap of OOM / fit / untried cells."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    models = grid_models(data)
    if not models:
        return _layout(_no_data(go.Figure(), "no trials with a batch size and max_len"),
                       PNG_FILES["oom_grid.png"])  # fmt: skip
    n_rows, n_cols = grid_shape(len(models))  # at most GRID_COLS a row, as in the PNG
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=models,
                        vertical_spacing=0.3 / n_rows)  # fmt: skip
    top = len(CELL_ORDER) - 1
    scale = []
    for i, state in enumerate(CELL_ORDER):
        scale += [[i / (top + 1), CELL_COLORS[state]], [(i + 1) / (top + 1), CELL_COLORS[state]]]
    for i, model in enumerate(models):
        row, col = i // n_cols + 1, i % n_cols + 1
        rows = oom_grid(data, model)
        batches, lengths = data.grid_axes[model]
        fig.add_trace(go.Heatmap(z=[[CELL_ORDER.index(c.state) for c in r] for r in rows],
                                 x=[str(x) for x in lengths], y=[str(b) for b in batches],
                                 text=[[_cell_text(c.label) for c in r] for r in rows],
                                 textfont={"size": 12},
                                 customdata=[[c.state for c in r] for r in rows],
                                 texttemplate="%{text}", colorscale=scale, zmin=-0.5,
                                 zmax=top + 0.5, showscale=False, name=model, xgap=2, ygap=2,
                                 hovertemplate="batch %{y}, max_len %{x}: %{customdata}"
                                 "<br>%{text}<extra>" + model + "</extra>"),
                      row=row, col=col)  # fmt: skip
        fig.update_xaxes(title={"text": "max_len (tokens)"}, type="category", row=row, col=col)
        fig.update_yaxes(title={"text": "batch size"}, type="category", row=row, col=col)
    legend = ", ".join(
        f"<span style='color:{CELL_COLORS[s]}'>&#9632;</span> {s}" for s in CELL_ORDER
    )
    fig.add_annotation(text=legend, showarrow=False, xref="paper", yref="paper", x=0.5, y=0,
                       yanchor="top", yshift=-70)  # below the last row's axis titles  # fmt: skip
    _layout(fig, PNG_FILES["oom_grid.png"], 460 * n_rows)
    return fig.update_layout(margin={"b": 110})


FIGURES = (best_figure, oom_rate_figure, memory_figure, history_figure, grid_figure)


def write_html(data: PlotData, path: Path) -> Path:
    """Write every figure into one HTML page at ``path``, plotly.js inlined once."""
    parts = []
    for i, (name, make) in enumerate(zip(PNG_FILES, FIGURES, strict=True)):
        fig = make(data)
        parts.append(f"<h2>{html.escape(PNG_FILES[name].format(metric=data.metric))}</h2>")
        parts.append(f"<p>{html.escape(_INTRO[name])}</p>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=i == 0,
                                 config={"displaylogo": False}))  # fmt: skip
    title = f"study {data.study}: {len(data.points)} trials, {len(data.complete())} completed"
    best = data.best()
    summary = (
        f"best: trial {best.number}, {best.model}, {data.metric} {best.value:.4f} ({best.shape})"
        if best is not None and best.value is not None
        else NO_COMPLETE
    )
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
        "h2{margin-top:2em}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p><b>{html.escape(summary)}</b></p>"
        + "\n".join(parts)
        + "</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path
