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

from search.observe.keep import kept_models
from search.observe.keep import models_not_kept
from search.record import attrs
from search.record.counts import requeued_numbers
from search.record.stored_spec import stored_spec_of
from search.record.trial_record import config_of
from search.record.trial_record import is_oom
from search.record.trial_record import metrics_of
from search.record.trial_record import model_of
from search.record.trial_record import ran_on
from search.record.trial_record import timings_of
from search.sampling.stages import gain
from search.sampling.stages import stage_of
from storage import compat
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
    # Worker time spent in training steps: the trials that recorded their phases (older ones
    # are left out, not counted as 0): their train seconds, and their whole seconds.
    train_seconds: float = 0.0
    timed_seconds: float = 0.0
    train_share: float | None = None

    @property
    def pruned_oom(self) -> int:
        """Trials pruned for memory, by any route."""
        return self.oom_real + self.oom_host + self.oom_predicted + self.oom_frontier


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
        name = model_of(t)
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
                row.best_trial_id = compat.trial_id(t)
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
        timings = timings_of(t)
        if attrs.TRAIN_PHASE in timings and seconds > 0:
            row.train_seconds += timings[attrs.TRAIN_PHASE]
            row.timed_seconds += seconds
    for name, row in rows.items():
        row.oom_rate = row.pruned_oom / row.trials if row.trials else 0.0
        row.train_share = train_share(row.train_seconds, row.timed_seconds)
        if peaks.get(name):
            row.median_peak_memory_mb = statistics.median(peaks[name])
    return list(rows.values())


def train_share(train_seconds: float, timed_seconds: float) -> float | None:
    """Share of the timed trials' wall time spent in training steps (None: none timed)."""
    return train_seconds / timed_seconds if timed_seconds > 0 else None


# The user attributes a report reads (the config only of each model's best trial).
SUMMARY_KEYS = (
    attrs.MODEL,
    attrs.OUTCOME,
    attrs.HANDED_BACK,  # outcome_of: a hand-back recorded before the outcome key
    attrs.SECONDS,
    attrs.OOM,
    attrs.OOM_KIND,
    attrs.OOM_PHASE,
    attrs.PEAK_MEMORY_MB,
    attrs.BATCH_SIZE,
    attrs.MAX_LEN,
    attrs.STAGE,
    attrs.MODEL_ARTIFACT,  # the kept models (search.observe.keep)
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
    trials = read_trials(study, storage=storage)
    rows = model_rows(trials, direction=direction)
    if isinstance(storage, optuna.storages.RDBStorage):
        best_ids = [r.best_trial_id for r in rows if r.best_trial_id is not None]
        configs = _best_configs(storage, best_ids)
        for row in rows:
            if row.best_trial_id is not None:
                row.best_config = configs.get(row.best_trial_id)
    stages = stage_rows(trials, direction=direction)
    if isinstance(storage, optuna.storages.RDBStorage):
        ids = {m["best_trial_id"] for st in stages for m in st["models"]} - {None}
        configs = _best_configs(storage, sorted(ids))
        for st in stages:
            for m in st["models"]:
                m["best_config"] = configs.get(m["best_trial_id"], m["best_config"])
    for st in stages:
        st["models"] = [_without(m, "best_trial_id") for m in st["models"]]
    total_seconds = sum(r.seconds for r in rows)
    return {
        "study": study.study_name,
        "direction": direction,
        "metric": study_metric(study),
        "n_trials_budget": study.user_attrs.get(attrs.STUDY_N_TRIALS),
        "trials": sum(r.trials for r in rows),
        # What spends the budget (search.record.counts.spent_count): the trials that trained, not
        # the preflight skips (predicted / frontier OOM) nor the FAIL trials re-run elsewhere.
        "trained": sum(r.trials - r.oom_predicted - r.oom_frontier - r.requeued for r in rows),
        "skipped": sum(r.oom_predicted + r.oom_frontier for r in rows),
        "worker_seconds": total_seconds,
        "oom_seconds": sum(r.oom_seconds for r in rows),
        # Share of the worker time of the trials that recorded their phases spent training.
        "train_share": train_share(
            sum(r.train_seconds for r in rows), sum(r.timed_seconds for r in rows)
        ),
        "best": _overall_best(study, rows, trials, storage, maximize=direction == "maximize"),
        "models": [
            {**_without(asdict(r), "best_trial_id"), "pruned_oom": r.pruned_oom} for r in rows
        ],
        "oom_configs": oom_configs(trials, [r.model for r in rows]),
        "stages": stages,
        "kept_models": kept_model_rows(study, trials),
        "models_not_kept": [  # search.observe.keep: completed, but the upload failed
            {"trial": n, "error": e} for n, e in sorted(models_not_kept(study).items())
        ],
    }


def stage_rows(
    trials: Sequence[FrozenTrial], *, direction: str = "maximize"
) -> list[dict[str, Any]]:
    """Per stage of a staged search, in the order the stages ran: the best per model, and
    ``gain``, what the stage's best adds over the best of the earlier stages (positive: better;
    for ``refine``, what refining gained). Empty for a single-stage study.
    """
    maximize = direction == "maximize"
    by_stage: dict[str, list[FrozenTrial]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        name = stage_of(t)
        if name is not None and t.state != TrialState.WAITING:
            by_stage.setdefault(name, []).append(t)
    out: list[dict[str, Any]] = []
    earlier: float | None = None
    for name, members in by_stage.items():
        models = model_rows(members, direction=direction)
        scored = [(r.best_value, r) for r in models if r.best_value is not None]
        best = min(scored, key=lambda vr: -vr[0] if maximize else vr[0], default=(0.0, None))[1]
        best_value = best.best_value if best is not None else None
        out.append(
            {
                "stage": name,
                "trials": len(members),
                "best_value": best_value,
                "best_trial": best.best_trial if best is not None else None,
                "best_before": earlier,
                "gain": gain(best_value, earlier, maximize=maximize),
                "models": [
                    {
                        "model": r.model,
                        "trials": r.trials,
                        "best_value": r.best_value,
                        "best_trial": r.best_trial,
                        "best_trial_id": r.best_trial_id,
                        "best_config": r.best_config,
                    }
                    for r in models
                ],
            }
        )
        if best_value is not None and (
            earlier is None or _is_better(best_value, earlier, maximize)
        ):
            earlier = best_value
    return out


def kept_model_rows(study: optuna.Study, trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
    """The trials whose model the study keeps (``search.observe.keep``), best first."""
    kept = kept_models(study, trials)  # one read of the study's system attributes
    by_number = {t.number: t for t in trials}
    rows = [
        by_number[n]
        for n in kept
        if n in by_number
        and by_number[n].state == TrialState.COMPLETE
        and by_number[n].value is not None
    ]
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    rows.sort(key=lambda t: (sign * float(t.value), t.number))  # type: ignore[arg-type]
    return [{"trial": t.number, "value": t.value, "artifact": kept[t.number][0]} for t in rows]


def read_trials(
    study: optuna.Study, *, storage: optuna.storages.BaseStorage | None = None
) -> list[FrozenTrial]:
    """The study's trials with what reports and plots read (only that, from an RDB storage)."""
    if isinstance(storage, optuna.storages.RDBStorage):
        study_id = storage.get_study_id_from_name(study.study_name)
        return read_summary_trials(
            storage.engine,
            study_id,
            SUMMARY_KEYS,
            ("model",),
            (attrs.RETRY_HISTORY, attrs.SYSTEM_TIMINGS),
        )
    return study.get_trials(deepcopy=False)


def study_metric(study: optuna.Study) -> str:
    """The study's metric: its stored spec's (``ndcg@10``), else its metric name."""
    spec = stored_spec_of(study)
    metric = (spec.get("study") or {}).get("metric") if isinstance(spec, dict) else None
    if not metric and study.metric_names:
        metric = study.metric_names[0]
    return str(metric or attrs.DEFAULT_METRIC)


def _overall_best(
    study: optuna.Study,
    rows: Sequence[ModelRow],
    trials: Sequence[FrozenTrial],
    storage: optuna.storages.BaseStorage | None,
    *,
    maximize: bool,
) -> dict[str, Any] | None:
    """The best trial of all: number, model, value, config, and its MRR@10 / Recall@k."""
    best: ModelRow | None = None
    for row in rows:
        if row.best_value is not None and (
            best is None or _is_better(row.best_value, best.best_value, maximize)
        ):
            best = row
    if best is None or best.best_trial is None:
        return None
    frozen = next((t for t in trials if t.number == best.best_trial), None)
    if isinstance(storage, optuna.storages.RDBStorage) and best.best_trial_id is not None:
        frozen = storage.get_trial(best.best_trial_id)  # the lean read left its metrics out
    metrics = metrics_of(frozen) if frozen is not None else {}
    recalls = sorted((k for k in metrics if k.startswith("recall@")), key=_cutoff)
    extra = {k: metrics[k] for k in ["mrr@10", *recalls] if k in metrics}
    ran = ran_on(frozen.user_attrs) if frozen is not None else {}  # device, precision
    return {
        "trial": best.best_trial,
        "model": best.model,
        "value": best.best_value,
        "config": best.best_config,
        **extra,
        **({"ran": ran} if ran else {}),
    }


def _cutoff(metric: str) -> int:
    """10 for ``recall@10`` (0 when the name has no number)."""
    tail = metric.rpartition("@")[2]
    return int(tail) if tail.isdigit() else 0


def oom_configs(trials: Sequence[FrozenTrial], models: Sequence[str]) -> list[dict[str, Any]]:
    """OOM trials grouped by model, batch size, max_len, kind and phase, with their numbers."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for t in trials:
        ua = t.user_attrs
        if not is_oom(ua):
            continue
        key = (
            model_of(t),
            ua.get(attrs.BATCH_SIZE),
            ua.get(attrs.MAX_LEN),
            str(ua.get(attrs.OOM_KIND) or "real"),
            ua.get(attrs.OOM_PHASE),
        )
        groups.setdefault(key, []).append(t.number)
    order = {m: i for i, m in enumerate(models)}
    kinds = {k: i for i, k in enumerate(attrs.OOM_KINDS)}

    def sort_key(key: tuple[Any, ...]) -> tuple[Any, ...]:
        model, batch, length, kind, phase = key
        return (order.get(model, len(order)), batch or 0, length or 0, kinds.get(kind, 9),
                str(phase))  # fmt: skip

    return [
        {
            "model": k[0],
            "batch_size": k[1],
            "max_len": k[2],
            "kind": k[3],
            "phase": k[4],
            "trials": sorted(groups[k]),
        }  # fmt: skip
        for k in sorted(groups, key=sort_key)
    ]


def _without(data: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != key}
