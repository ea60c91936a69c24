"""Per-model report of a study: outcomes, OOM rate and cost, best score, memory vs quality.

Used for the table at the end of ``search run`` and by ``search report [--json]``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState
from rich.table import Table

from search import attrs
from search.budget import requeued_numbers
from search.trial_record import config_of
from search.trial_record import is_oom
from storage import read_summary_trials
from storage import read_user_attr


@dataclass
class ModelRow:
    """One model's line of the report."""

    model: str
    trials: int = 0
    complete: int = 0
    pruned_early: int = 0
    oom_real: int = 0
    oom_host: int = 0
    oom_predicted: int = 0
    oom_frontier: int = 0
    failed: int = 0
    requeued: int = 0  # FAIL trials re-run elsewhere (stale heartbeat, handed back on SIGTERM)
    running: int = 0
    oom_rate: float = 0.0
    oom_seconds: float = 0.0
    seconds: float = 0.0
    best_value: float | None = None
    best_trial: int | None = None
    best_trial_id: int | None = None
    best_config: dict[str, Any] | None = None
    median_peak_memory_mb: float | None = None

    @property
    def pruned_oom(self) -> int:
        """Trials pruned for memory, by any route."""
        return self.oom_real + self.oom_host + self.oom_predicted + self.oom_frontier


def _model_of(trial: FrozenTrial) -> str:
    return str(trial.user_attrs.get(attrs.MODEL) or trial.params.get("model") or "?")


def _is_better(value: float, best: float | None, maximize: bool) -> bool:
    return best is None or (value > best if maximize else value < best)


def model_rows(trials: Sequence[FrozenTrial], *, direction: str = "maximize") -> list[ModelRow]:
    """Aggregate trials into one row per model, in order of first appearance."""
    rows: dict[str, ModelRow] = {}
    peaks: dict[str, list[float]] = {}
    maximize = direction == "maximize"
    requeued = requeued_numbers(trials)
    for t in trials:
        if t.state == TrialState.WAITING:
            continue
        name = _model_of(t)
        row = rows.setdefault(name, ModelRow(model=name))
        row.trials += 1
        ua = t.user_attrs
        seconds = float(ua.get(attrs.SECONDS) or 0.0)
        row.seconds += seconds
        if is_oom(ua):
            kind = str(ua.get(attrs.OOM_KIND) or "real")
            setattr(row, f"oom_{kind}", getattr(row, f"oom_{kind}", 0) + 1)
            row.oom_seconds += seconds
        elif t.state == TrialState.COMPLETE:
            row.complete += 1
            if t.value is not None and _is_better(t.value, row.best_value, maximize):
                row.best_value, row.best_trial = t.value, t.number
                row.best_trial_id = t._trial_id
                row.best_config = config_of(t)
        elif t.state == TrialState.PRUNED:
            row.pruned_early += 1
        elif t.state == TrialState.FAIL and t.number in requeued:
            row.requeued += 1
        elif t.state == TrialState.FAIL:
            row.failed += 1
        elif t.state == TrialState.RUNNING:
            row.running += 1
        peak = ua.get(attrs.PEAK_MEMORY_MB)
        if peak is not None and not is_oom(ua):
            peaks.setdefault(name, []).append(float(peak))
    for name, row in rows.items():
        row.oom_rate = row.pruned_oom / row.trials if row.trials else 0.0
        if peaks.get(name):
            row.median_peak_memory_mb = statistics.median(peaks[name])
    return list(rows.values())


# The user attributes a report reads (the config only of each model's best trial).
SUMMARY_KEYS = (
    attrs.MODEL,
    attrs.OUTCOME,
    attrs.SECONDS,
    attrs.OOM,
    attrs.OOM_KIND,
    attrs.PEAK_MEMORY_MB,
)


def _best_configs(storage: optuna.storages.RDBStorage, trial_ids: list[int]) -> dict[int, Any]:
    """Trial id -> effective config (``search:config``; user ``config`` of older studies)."""
    if not trial_ids:
        return {}
    configs = read_user_attr(storage.engine, trial_ids, attrs.SYSTEM_CONFIG, system=True)
    older = [i for i in trial_ids if i not in configs]
    if older:
        configs.update(read_user_attr(storage.engine, older, attrs.CONFIG))
    return configs


def study_report(
    study: optuna.Study, *, storage: optuna.storages.BaseStorage | None = None
) -> dict[str, Any]:
    """The report of ``study`` as plain data (what ``search report --json`` prints).

    With the study's RDB ``storage`` given, only what the report shows is read (several times
    faster at 10,000 trials); otherwise every trial is loaded through Optuna.
    """
    direction = study.direction.name.lower()
    if isinstance(storage, optuna.storages.RDBStorage):
        study_id = storage.get_study_id_from_name(study.study_name)
        trials = read_summary_trials(
            storage.engine, study_id, SUMMARY_KEYS, ("model",), (attrs.RETRY_HISTORY,)
        )
        rows = model_rows(trials, direction=direction)
        best_ids = [r.best_trial_id for r in rows if r.best_trial_id is not None]
        configs = _best_configs(storage, best_ids)
        for row in rows:
            if row.best_trial_id is not None:
                row.best_config = configs.get(row.best_trial_id)
    else:
        rows = model_rows(study.get_trials(deepcopy=False), direction=direction)
    total_seconds = sum(r.seconds for r in rows)
    return {
        "study": study.study_name,
        "direction": direction,
        "n_trials_budget": study.user_attrs.get(attrs.STUDY_N_TRIALS),
        "trials": sum(r.trials for r in rows),
        "worker_seconds": total_seconds,
        "oom_seconds": sum(r.oom_seconds for r in rows),
        "models": [
            {**_without(asdict(r), "best_trial_id"), "pruned_oom": r.pruned_oom} for r in rows
        ],
    }


def _without(data: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != key}


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _short_config(config: dict[str, Any] | None) -> str:
    if not config:
        return "-"
    return (
        f"b={config.get('batch_size')} len={config.get('max_len')} "
        f"lr={config.get('lr', 0):.1e} T={config.get('temperature', 0):.3f}"
    )


def report_table(report: dict[str, Any], *, metric: str = "nDCG@10") -> Table:
    """A rich table of the report's model rows."""
    table = Table(title=f"study {report['study']}: per model", title_justify="left")
    for col in ("model", "trials", "complete", "pruned", "OOM real/host/pred/front", "failed"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for col in ("OOM rate", "OOM s", f"best {metric}", "peak MB (median)", "best config"):
        table.add_column(col, justify="left" if col == "best config" else "right")
    for r in report["models"]:
        table.add_row(
            r["model"],
            str(r["trials"]),
            str(r["complete"]),
            str(r["pruned_early"]),
            f"{r['oom_real']}/{r['oom_host']}/{r['oom_predicted']}/{r['oom_frontier']}",
            str(r["failed"]),
            f"{r['oom_rate']:.0%}",
            f"{r['oom_seconds']:.1f}",
            _fmt(r["best_value"]),
            _fmt(r["median_peak_memory_mb"], ".0f"),
            _short_config(r["best_config"]),
        )
    return table
