"""The trial record: what the runner writes on a trial, and how it is read back.

The counterpart of ``search.observe.report``: the runner calls the builders here instead of
building attribute dicts itself. User attributes stay short and flat (one line per trial in the
dashboard's table); the effective config and the metrics are system attributes
(``search:config``, ``search:metrics``, ``search:history``). Readers fall back to the user
attributes of studies written before (``config``, ``metrics``, the device label).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search.record import attrs

__all__ = [
    "TrialRecord",
    "config_of",
    "device_kind_of",
    "error_of",
    "handed_back_attrs",
    "lost_attrs",
    "is_oom",
    "metric_value",
    "metrics_of",
    "model_of",
    "name_metric",
    "outcome_of",
    "short_error",
    "slowest_phase",
    "timings_of",
    "trial_summary",
    "write_record",
]

ERROR_CHARS = 300  # the one-line error of a failure, cut to a table cell


@dataclass
class TrialRecord:
    """Attributes to set on a trial: short user attributes, JSON system attributes."""

    user: dict[str, Any] = field(default_factory=dict)
    system: dict[str, Any] = field(default_factory=dict)

    def update(self, other: TrialRecord) -> TrialRecord:
        """Add ``other``'s attributes (its values win); returns self."""
        self.user.update(other.user)
        self.system.update(other.system)
        return self


def short_error(text: str, limit: int = ERROR_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters (a table cell)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def handed_back_attrs() -> dict[str, Any]:
    """User attributes of a trial handed back on SIGTERM / SIGINT (set with its re-queue)."""
    return {attrs.HANDED_BACK: True, attrs.OUTCOME: attrs.OUTCOME_HANDED_BACK}


STALE_ERROR = "worker lost (heartbeat stale)"


def lost_attrs(error: str = STALE_ERROR) -> dict[str, Any]:
    """User attributes of a trial failed because its worker was lost: no heartbeat for the
    grace period (the default), or an error of the worker itself (``error``: its line)."""
    return {attrs.OUTCOME: attrs.OUTCOME_FAILED, attrs.ERROR: short_error(error)}


def write_record(storage: optuna.storages.BaseStorage, trial_id: int, record: TrialRecord) -> None:
    """Set a record's attributes, in one transaction where the storage can."""
    set_all = getattr(storage, "set_trial_attrs", None)
    if set_all is not None:
        set_all(trial_id, record.user, record.system)
        return
    for key, value in record.user.items():
        storage.set_trial_user_attr(trial_id, key, value)
    for key, value in record.system.items():
        storage.set_trial_system_attr(trial_id, key, value)


def name_metric(study: optuna.Study, metric: str) -> None:
    """Name the study's objective ``metric`` (dashboard plots say it), unless it is named."""
    if study.metric_names is not None:
        return
    with warnings.catch_warnings():  # experimental since Optuna 3.2, stable in use
        warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([metric])


# Readers: new records first, the attributes of older studies as a fallback.


def config_of(trial: FrozenTrial) -> dict[str, Any] | None:
    """The trial's effective config (system ``search:config``, else user ``config``)."""
    config = trial.system_attrs.get(attrs.SYSTEM_CONFIG, trial.user_attrs.get(attrs.CONFIG))
    return config if isinstance(config, dict) else None


def metrics_of(trial: FrozenTrial) -> dict[str, float]:
    """The last epoch's metrics (system ``search:metrics``, else user ``metrics``)."""
    metrics = trial.system_attrs.get(attrs.SYSTEM_METRICS, trial.user_attrs.get(attrs.METRICS))
    return dict(metrics) if isinstance(metrics, dict) else {}


def error_of(trial: FrozenTrial) -> str:
    """The trial's whole error line (``error`` is cut to a table cell; ``search:error`` not)."""
    return str(trial.system_attrs.get(attrs.SYSTEM_ERROR) or trial.user_attrs.get(attrs.ERROR, ""))


def metric_value(trial: FrozenTrial, metric: str = attrs.DEFAULT_METRIC) -> float | None:
    """The trial's final value of ``metric`` (flat user attribute, else its metrics)."""
    value = trial.user_attrs.get(metric, metrics_of(trial).get(metric))
    return float(value) if isinstance(value, (int, float)) else None


def device_kind_of(user_attrs: Mapping[str, Any]) -> str | None:
    """``cuda`` / ``cpu``...: the ``device_kind`` attribute, else parsed from ``device``."""
    kind = user_attrs.get(attrs.DEVICE_KIND)
    if isinstance(kind, str) and kind:
        return kind
    label = user_attrs.get(attrs.DEVICE)
    if not isinstance(label, str) or not label:
        return None
    return label.split()[0].split(":")[0]


def ran_on(user_attrs: Mapping[str, Any]) -> dict[str, str]:
    """What the trial ran on, where recorded: ``{"device": "cpu", "precision": "fp32"}``
    (the device its ``auto`` resolved to, the precision its ``amp`` gave there).

    Example:
        >>> ran_on({"device": "cuda:0 (NVIDIA H100, 80.0 GiB)", "precision": "bf16"})
        {'device': 'cuda:0', 'precision': 'bf16'}
    """
    ran: dict[str, str] = {}
    label = user_attrs.get(attrs.DEVICE)
    if isinstance(label, str) and label.split():
        ran["device"] = label.split()[0]
    precision = user_attrs.get(attrs.PRECISION)
    if isinstance(precision, str) and precision:
        ran["precision"] = precision
    return ran


def timings_of(trial: FrozenTrial) -> dict[str, float]:
    """Seconds per phase of the trial (``search:timings``); empty for older studies."""
    timings = trial.system_attrs.get(attrs.SYSTEM_TIMINGS)
    if not isinstance(timings, dict):
        return {}
    return {str(k): float(v) for k, v in timings.items() if isinstance(v, (int, float))}


def slowest_phase(trial: FrozenTrial) -> str | None:
    """``slowest: evaluate 4.2 s of 9.8 s`` (of the trial's ``seconds``), or None.

    None unless the objective timed its own phases (``load``...): not for a killed child, an
    objective without the clock (a test's fake) nor a study from before issue 17.
    """
    timings = timings_of(trial)
    if not set(timings) - {"prepare", "start", "record"}:
        return None
    name = max(timings, key=lambda k: timings[k])
    total = trial.user_attrs.get(attrs.SECONDS)
    of = f" of {float(total):.1f} s" if isinstance(total, (int, float)) else ""
    return f"slowest: {name} {timings[name]:.1f} s{of}"


def is_oom(user_attrs: Mapping[str, Any]) -> bool:
    """Whether the trial ran out of memory or was skipped for memory."""
    return user_attrs.get(attrs.OOM) is True or user_attrs.get(attrs.OUTCOME) == attrs.OUTCOME_OOM


def model_of(trial: FrozenTrial) -> str:
    """The trial's model: its ``model`` attribute, else its ``model`` parameter, else ``?``."""
    return str(trial.user_attrs.get(attrs.MODEL) or trial.params.get("model") or "?")


def outcome_of(trial: FrozenTrial) -> str:
    """One of ``attrs.OUTCOMES`` (or ``waiting``), also for trials recorded before issue 8."""
    ua = trial.user_attrs
    if trial.state == TrialState.WAITING:
        return "waiting"
    if ua.get(attrs.HANDED_BACK) and trial.state == TrialState.FAIL:
        return attrs.OUTCOME_HANDED_BACK
    if is_oom(ua):
        return attrs.OUTCOME_OOM
    stored = ua.get(attrs.OUTCOME)
    if trial.state == TrialState.RUNNING:
        return attrs.OUTCOME_RUNNING
    if stored in attrs.OUTCOMES and stored != attrs.OUTCOME_RUNNING:
        return str(stored)
    if trial.state == TrialState.COMPLETE:
        return attrs.OUTCOME_COMPLETE
    if trial.state == TrialState.PRUNED:
        return attrs.OUTCOME_PRUNED
    return attrs.OUTCOME_FAILED


def _gib(mb: object) -> str | None:
    return f"{float(mb) / 1024:.1f}" if isinstance(mb, (int, float)) else None


def _what(trial: FrozenTrial, *, ran: bool = True) -> str:
    """``bge-m3-ko b64 len384 (cpu, fp32)``: with ``ran``, where and in what it trained."""
    ua = trial.user_attrs
    config = config_of(trial) or {}
    model = ua.get(attrs.MODEL, config.get("model", trial.params.get("model", "?")))
    batch = ua.get(attrs.BATCH_SIZE, config.get("batch_size"))
    max_len = ua.get(attrs.MAX_LEN, config.get("max_len"))
    parts = [str(model)]
    if batch is not None:
        parts.append(f"b{batch}")
    if max_len is not None:
        parts.append(f"len{max_len}")
    on = ran_on(ua) if ran else {}
    if "precision" in on:  # what ran, not what the config asked (amp, device auto)
        parts.append(f"({on.get('device', '?')}, {on['precision']})")
    return " ".join(parts)


def _metric_name(trial: FrozenTrial, metric: str | None) -> str:
    if metric:
        return metric
    if attrs.DEFAULT_METRIC in trial.user_attrs:
        return attrs.DEFAULT_METRIC
    flat = [k for k in trial.user_attrs if "@" in k]
    return flat[0] if flat else attrs.DEFAULT_METRIC


def trial_summary(
    trial: FrozenTrial,
    *,
    metric: str | None = None,
    pruner: str | None = None,
    requeued_as: int | None = None,
) -> str:
    """A one-line human summary of a trial, for the dashboard's note.

    Example:
        >>> import optuna
        >>> t = optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs={
        ...     "outcome": "oom", "oom": True, "oom_kind": "real", "oom_phase": "backward",
        ...     "peak_memory_mb": 23654.4, "device_memory_mb": 24576.0,
        ...     "model": "bge-m3-ko", "batch_size": 64, "max_len": 384})
        >>> trial_summary(t)
        'OOM (real) in backward at 23.1 of 24.0 GiB — bge-m3-ko b64 len384'

    Args:
        trial: The trial (any state; records from before issue 8 too).
        metric: The study metric (default: the flat ``ndcg@10``-like attribute found).
        pruner: The pruner's type (``median``...), to say which rule pruned the trial.
        requeued_as: Number of the trial that re-runs a handed-back or stale one.

    Returns:
        One line; a trained trial's names its slowest phase (``slowest_phase``) just before
        what it trained (the line still ends with the model and shape).
    """
    line = _summary(trial, metric=metric, pruner=pruner, requeued_as=requeued_as)
    slowest = slowest_phase(trial)
    if not slowest:
        return line
    at = line.rfind(f" — {_what(trial)}")
    return f"{line[:at]} — {slowest}{line[at:]}" if at >= 0 else f"{line} — {slowest}"


def _summary(
    trial: FrozenTrial, *, metric: str | None, pruner: str | None, requeued_as: int | None
) -> str:
    ua = trial.user_attrs
    outcome = outcome_of(trial)
    what = _what(trial)
    name = _metric_name(trial, metric)
    again = f", re-queued as trial {requeued_as}" if requeued_as is not None else ", re-queued"
    if outcome == attrs.OUTCOME_OOM:
        kind = str(ua.get(attrs.OOM_KIND) or "real")
        total = _gib(ua.get(attrs.DEVICE_MEMORY_MB))
        if kind == "frontier":
            frontier = ua.get(attrs.OOM_FRONTIER_TRIAL)
            by = f"OOM trial {frontier}" if frontier is not None else "an earlier OOM"
            return f"skipped: dominated by {by} — {_what(trial, ran=False)}"
        if kind == "predicted":
            estimate = _gib(ua.get(attrs.MEMORY_ESTIMATE_MB))
            size = f"estimate {estimate} of {total} GiB" if estimate and total else "estimate"
            return f"OOM predicted: {size} — {_what(trial, ran=False)}"
        phase = ua.get(attrs.OOM_PHASE)
        where = f" in {phase}" if phase else ""
        peak = _gib(ua.get(attrs.PEAK_MEMORY_MB))
        at = f" at {peak} of {total} GiB" if peak and total else ""
        if not at and total:  # no peak measured (a child killed by the kernel)
            at = f" on {total} GiB"
        return f"OOM ({kind}){where}{at} — {what}"
    if outcome == attrs.OUTCOME_COMPLETE:
        value = trial.value if trial.value is not None else metric_value(trial, name)
        score = f"{name} {value:.2f}" if value is not None else "no value"
        peak = _gib(ua.get(attrs.PEAK_MEMORY_MB))
        return f"complete — {score} — {what}" + (f", peak {peak} GiB" if peak else "")
    if outcome == attrs.OUTCOME_PRUNED:
        rule = f" by the {pruner} rule" if pruner else ""
        text = f"pruned{rule}"
        if trial.intermediate_values:
            seen = max(trial.intermediate_values)  # the step axis: training examples seen
            value = trial.intermediate_values[seen]
            text += f" at {seen:,} examples seen — {name} {value:.2f}"
        return f"{text} — {what}"
    if outcome == attrs.OUTCOME_HANDED_BACK:
        return f"handed back (worker stopped){again} — {what}"
    if outcome == attrs.OUTCOME_FAILED:
        error = ua.get(attrs.ERROR)
        if not error and trial.state == TrialState.FAIL:  # before issue 18: no error recorded
            error = STALE_ERROR
        rerun = f", re-queued as trial {requeued_as}" if requeued_as is not None else ""
        if error:
            return f"failed: {short_error(str(error), 200)}{rerun} — {what}"
        return f"failed — {what}"
    if outcome == "waiting":
        return f"waiting — {what}" if trial.params else "waiting"
    return f"running — {_what(trial, ran=False)} on {ua.get(attrs.DEVICE, '?')}"
