"""What the plots of a study show, as plain data: one point per trial, Pareto front, OOM grid.

Kept free of matplotlib and plotly so the report and tests can use it without the ``plots``
extra.

Example:
    >>> pts = [_point(0, "m", "complete", 0.5, 2048.0), _point(1, "m", "complete", 0.7, 4096.0),
    ...        _point(2, "m", "complete", 0.6, 8192.0)]
    >>> [p.number for p in pareto_front(pts, maximize=True)]
    [0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search.record import attrs
from search.record.trial_record import model_of
from search.record.trial_record import outcome_of

MIB_PER_GIB = 1024.0

# Outcome of a trial, as the plots tell it apart (the trial record's vocabulary).
COMPLETE = attrs.OUTCOME_COMPLETE
PRUNED = attrs.OUTCOME_PRUNED  # stopped early by the pruner (it fit in memory)
OOM = attrs.OUTCOME_OOM
FAILED = attrs.OUTCOME_FAILED
RUNNING = attrs.OUTCOME_RUNNING
_LEFT_OUT = ("waiting", attrs.OUTCOME_HANDED_BACK)  # not tried yet, or re-run as another trial

# Cell of the batch x max_len grid of a model.
CELL_UNTRIED = "untried (or failed)"  # failed for another reason: its memory is unknown
CELL_FIT = "fit"
CELL_OOM = "OOM"
CELL_BOTH = "fit + OOM"  # some trials of this shape fit, others ran out (e.g. host vs device)


@dataclass(frozen=True)
class TrialPoint:
    """One finished or running trial, as the plots need it."""

    number: int
    model: str
    outcome: str  # COMPLETE | PRUNED | OOM | FAILED | RUNNING
    value: float | None
    peak_memory_mb: float | None
    batch_size: int | None = None
    max_len: int | None = None
    oom_kind: str | None = None
    oom_phase: str | None = None

    @property
    def peak_gib(self) -> float | None:
        """Peak memory in GiB (None when not measured)."""
        return None if self.peak_memory_mb is None else self.peak_memory_mb / MIB_PER_GIB

    @property
    def shape(self) -> str:
        """``b64 len384`` (what decides the memory of a config)."""
        return f"b{self.batch_size} len{self.max_len}"


@dataclass
class PlotData:
    """Everything the plots of one study draw."""

    study: str
    metric: str  # display name, e.g. "nDCG@10"
    maximize: bool
    points: list[TrialPoint]
    models: list[str]  # the spec's order, then any other model seen
    grid_axes: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)

    def complete(self, model: str | None = None) -> list[TrialPoint]:
        """Completed trials with a value (of ``model`` when given)."""
        return [
            p
            for p in self.points
            if p.outcome == COMPLETE
            and p.value is not None
            and (model is None or p.model == model)
        ]

    def of_model(self, model: str) -> list[TrialPoint]:
        """Every trial of ``model``."""
        return [p for p in self.points if p.model == model]

    def best(self, model: str | None = None) -> TrialPoint | None:
        """The best completed trial (of ``model`` when given)."""
        done = self.complete(model)
        if not done:
            return None
        key = (lambda p: p.value) if self.maximize else (lambda p: -p.value)  # type: ignore
        return max(done, key=key)


def _point(
    number: int, model: str, outcome: str, value: float | None, peak: float | None
) -> TrialPoint:
    return TrialPoint(number, model, outcome, value, peak)


def metric_label(metric: str) -> str:
    """Display name of a spec metric: ``ndcg@10`` -> ``nDCG@10``, ``mrr@10`` -> ``MRR@10``."""
    head, _, tail = metric.partition("@")
    pretty = {"ndcg": "nDCG", "mrr": "MRR", "recall": "Recall", "map": "MAP"}.get(head.lower())
    return f"{pretty or head}@{tail}" if tail else (pretty or metric)


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def trial_point(trial: FrozenTrial) -> TrialPoint | None:
    """The point of ``trial`` (None for one still waiting, or handed back and re-queued)."""
    outcome = outcome_of(trial)
    if outcome in _LEFT_OUT:
        return None
    ua = trial.user_attrs
    peak = ua.get(attrs.PEAK_MEMORY_MB)
    value = trial.value if trial.state == TrialState.COMPLETE else None
    return TrialPoint(
        number=trial.number,
        model=model_of(trial),
        outcome=outcome,
        value=None if value is None else float(value),
        peak_memory_mb=None if peak is None or outcome == OOM else float(peak),
        batch_size=_int_or_none(ua.get(attrs.BATCH_SIZE)),
        max_len=_int_or_none(ua.get(attrs.MAX_LEN)),
        oom_kind=str(ua.get(attrs.OOM_KIND) or "real") if outcome == OOM else None,
        oom_phase=ua.get(attrs.OOM_PHASE) if outcome == OOM else None,
    )


def _int_list(value: Any) -> list[int]:
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return list(value)
    return []


def spec_grid_axes(spec: dict[str, Any] | None, model: str) -> tuple[list[int], list[int]]:
    """The batch sizes and lengths ``model`` may take, from a stored spec (empty if unknown)."""
    if not isinstance(spec, dict):
        return [], []
    space = spec.get("space") or {}
    if not isinstance(space, dict):
        return [], []
    cond = (space.get("conditions") or {}).get(model) or {}
    batch = _int_list(cond.get("batch_size")) or _int_list(space.get("batch_size"))
    length = _int_list(cond.get("max_len")) or _int_list(space.get("max_len"))
    return batch, length


def plot_data(
    trials: Sequence[FrozenTrial],
    *,
    study: str,
    metric: str = attrs.DEFAULT_METRIC,
    maximize: bool = True,
    spec: dict[str, Any] | None = None,
    skip: frozenset[int] = frozenset(),
) -> PlotData:
    """Points, model order and OOM-grid axes of a study's ``trials``.

    Args:
        trials: The study's trials (WAITING ones are left out).
        study: Study name, for titles.
        metric: The spec's metric (``ndcg@10``) or a display name.
        maximize: The study's direction.
        spec: The stored spec (the study's ``spec`` attribute): model order and grid axes.
        skip: Trial numbers to leave out (failed trials that were re-run).
    """
    points = [p for t in trials if t.number not in skip and (p := trial_point(t)) is not None]
    models = list((spec or {}).get("models") or {}) if isinstance(spec, dict) else []
    for p in points:
        if p.model not in models:
            models.append(p.model)
    axes: dict[str, tuple[list[int], list[int]]] = {}
    for model in models:
        batch, length = spec_grid_axes(spec, model)
        for p in points:
            if p.model == model and p.batch_size is not None and p.max_len is not None:
                batch = batch if p.batch_size in batch else [*batch, p.batch_size]
                length = length if p.max_len in length else [*length, p.max_len]
        axes[model] = (sorted(batch), sorted(length))
    return PlotData(
        study=study,
        metric=metric_label(metric),
        maximize=maximize,
        points=points,
        models=models,
        grid_axes=axes,
    )


def pareto_front(points: Sequence[TrialPoint], *, maximize: bool = True) -> list[TrialPoint]:
    """Completed trials no other beats on both score and peak memory, by increasing memory."""
    measured = [p for p in points if p.value is not None and p.peak_memory_mb is not None]
    sign = 1.0 if maximize else -1.0
    ordered = sorted(measured, key=lambda p: (p.peak_memory_mb, -sign * p.value))  # type: ignore
    front: list[TrialPoint] = []
    for p in ordered:
        if not front or sign * p.value > sign * front[-1].value:  # type: ignore[operator]
            front.append(p)
    return front


@dataclass(frozen=True)
class GridCell:
    """One batch x max_len cell of a model's OOM grid."""

    batch_size: int
    max_len: int
    fit: int  # trials of this shape that trained (complete, or pruned by the pruner)
    oom: int
    kinds: tuple[str, ...]  # OOM kinds seen, in attrs.OOM_KINDS order
    failed: int = 0  # trials of this shape that failed for another reason (memory unknown)

    @property
    def state(self) -> str:
        """CELL_UNTRIED | CELL_FIT | CELL_OOM | CELL_BOTH."""
        if self.oom and self.fit:
            return CELL_BOTH
        if self.oom:
            return CELL_OOM
        return CELL_FIT if self.fit else CELL_UNTRIED

    @property
    def label(self) -> str:
        """Short cell text: ``3 ok``, ``2 OOM (real)``, ``1 ok, 1 OOM (host)`` or ``-``."""
        parts = []
        if self.fit:
            parts.append(f"{self.fit} ok")
        if self.oom:
            parts.append(f"{self.oom} OOM ({'/'.join(self.kinds)})")
        if self.failed:
            parts.append(f"{self.failed} failed")
        return ", ".join(parts) or "-"


def oom_grid(data: PlotData, model: str) -> list[list[GridCell]]:
    """Rows (one per batch size, ascending) of cells (one per max_len, ascending)."""
    batches, lengths = data.grid_axes.get(model, ([], []))
    rows = []
    for b in batches:
        row = []
        for n in lengths:
            same = [
                p
                for p in data.of_model(model)
                if p.batch_size == b and p.max_len == n and p.outcome != RUNNING
            ]
            ooms = [p for p in same if p.outcome == OOM]
            kinds = {p.oom_kind for p in ooms}
            row.append(
                GridCell(
                    batch_size=b,
                    max_len=n,
                    fit=sum(p.outcome in (COMPLETE, PRUNED) for p in same),
                    oom=len(ooms),
                    kinds=tuple(k for k in attrs.OOM_KINDS if k in kinds),
                    failed=sum(p.outcome == FAILED for p in same),
                )
            )
        rows.append(row)
    return rows


def oom_rate(data: PlotData, model: str) -> dict[str, float]:
    """Share of ``model``'s finished trials that ended in OOM, per kind."""
    done = [p for p in data.of_model(model) if p.outcome != RUNNING]
    if not done:
        return {kind: 0.0 for kind in attrs.OOM_KINDS}
    return {kind: sum(p.oom_kind == kind for p in done) / len(done) for kind in attrs.OOM_KINDS}


def memory_xy(points: Sequence[TrialPoint]) -> tuple[list[float], list[float]]:
    """Peak GiB and value of the points that have both."""
    pairs = [(p.peak_gib, p.value) for p in points if p.peak_gib is not None]
    kept = [(x, y) for x, y in pairs if y is not None]
    return [x for x, _ in kept], [y for _, y in kept]


def history_xy(points: Sequence[TrialPoint]) -> tuple[list[int], list[float]]:
    """Trial number and value of the points that have a value."""
    kept = [(p.number, p.value) for p in points if p.value is not None]
    return [x for x, _ in kept], [y for _, y in kept]


def best_so_far(data: PlotData) -> tuple[list[int], list[float]]:
    """The best value after each completed trial, by trial number."""
    xs: list[int] = []
    ys: list[float] = []
    for p in sorted(data.complete(), key=lambda p: p.number):
        assert p.value is not None
        better = not ys or (p.value > ys[-1] if data.maximize else p.value < ys[-1])
        xs.append(p.number)
        ys.append(p.value if better else ys[-1])
    return xs, ys
