"""The records a worker writes on its trials: claimed, skipped by the preflight, its outcome.

The builders that need the worker's own types (``DeviceInfo``, ``TrialOutcome``,
``PreflightDecision``); the ``TrialRecord`` they return, how it is written and how a trial is
read back live in ``search.record.trial_record``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING
from typing import Any

from search.record import attrs
from search.record.trial_record import TrialRecord
from search.record.trial_record import short_error

if TYPE_CHECKING:
    from search.memory.device import DeviceInfo
    from search.memory.preflight import PreflightDecision
    from search.record.config import TrialConfig
    from search.worker.isolation import TrialOutcome

__all__ = ["claimed_record", "outcome_record", "skip_record", "trial_timings"]


def _gpu_name(device: DeviceInfo) -> str | None:
    """``NVIDIA H100 80GB HBM3`` from ``cuda:0 (NVIDIA H100 80GB HBM3, 79.1 GiB)``."""
    if device.kind == "cpu" or "(" not in device.label:
        return None
    inside = device.label.split("(", 1)[1].rstrip(")")
    name, sep, _ = inside.rpartition(", ")
    return name or None if sep else None


def claimed_record(
    cfg: TrialConfig,
    device: DeviceInfo,
    *,
    host: str,
    gpu: str | None,
    worker: str | None,
    memory_estimate_mb: float | None = None,
    model_facts: str | None = None,
    precision: str | None = None,
) -> TrialRecord:
    """The first attributes of a claimed trial, written before it trains (outcome running).

    ``model_facts``: where the estimate's architecture facts came from
    (``search.spec.model_facts``); ``precision``: what it computes in
    (``search.record.precision.precision_name``; ``device`` says where it runs).
    """
    user: dict[str, Any] = {
        attrs.OUTCOME: attrs.OUTCOME_RUNNING,
        attrs.MODEL: cfg.model,
        attrs.BATCH_SIZE: cfg.batch_size,
        attrs.MAX_LEN: cfg.max_len,
        attrs.DEVICE: device.label,
        attrs.DEVICE_KIND: device.kind,
        attrs.DEVICE_MEMORY_MB: device.total_mb,
        attrs.HOST: host,
        attrs.GPU: gpu,
        attrs.WORKER: worker,
    }
    name = _gpu_name(device)
    if name:
        user[attrs.GPU_NAME] = name
    user = {k: v for k, v in user.items() if v is not None}  # no "null" column on CPU
    if memory_estimate_mb is not None:
        user[attrs.MEMORY_ESTIMATE_MB] = memory_estimate_mb
    if model_facts is not None:
        user[attrs.MODEL_FACTS] = model_facts
    if precision is not None:
        user[attrs.PRECISION] = precision
    return TrialRecord(user=user, system={attrs.SYSTEM_CONFIG: cfg.to_json()})


def skip_record(decision: PreflightDecision, seconds: float) -> TrialRecord:
    """A preflight skip: outcome ``oom`` of kind ``predicted`` or ``frontier``.

    Beside the estimate (``claimed_record``): its error band and the free memory it was
    compared with.
    """
    user: dict[str, Any] = {
        attrs.OUTCOME: attrs.OUTCOME_OOM,
        attrs.OOM: True,
        attrs.OOM_KIND: decision.kind,
        attrs.ERROR: short_error(decision.reason),
        attrs.SECONDS: round(seconds, 3),
        attrs.MEMORY_ESTIMATE_BAND: decision.band,
        attrs.FREE_MEMORY_MB: decision.free_bytes / 2**20,
    }
    if decision.frontier_trial is not None:
        user[attrs.OOM_FRONTIER_TRIAL] = decision.frontier_trial
    return TrialRecord(user=user)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def trial_timings(outcome: TrialOutcome, *, prepare: float, record: float) -> dict[str, float]:
    """Seconds per phase of a trained trial, in ``attrs.TIMING_PHASES`` order, rounded to ms.

    ``prepare`` and ``record`` are the worker's, the others the child's (``outcome.timings``;
    an objective's own extra phases follow).
    """
    seconds = {"prepare": prepare, **outcome.timings, "record": record}
    order = [k for k in attrs.TIMING_PHASES if k in seconds]
    order += [k for k in seconds if k not in attrs.TIMING_PHASES]
    return {k: round(max(0.0, float(seconds[k])), 3) for k in order}


def outcome_record(
    outcome: TrialOutcome, metric: str, seconds: float, timings: dict[str, float] | None = None
) -> TrialRecord:
    """An isolated run's outcome; ``TrialRecord.user[OUTCOME]`` also says how to tell it.

    ``complete`` is told with the metric's value, ``pruned`` and ``oom`` as PRUNED (an OOM is
    an answer about memory: TPE learns from PRUNED trials, README), ``failed`` as FAIL.
    ``timings`` (``trial_timings``) is kept as the system attribute ``search:timings``.
    """
    user: dict[str, Any] = {attrs.SECONDS: round(seconds, 3)}  # ms: a short cell
    system: dict[str, Any] = {}
    if timings:
        system[attrs.SYSTEM_TIMINGS] = dict(timings)
    if outcome.peak_memory_mb is not None:
        user[attrs.PEAK_MEMORY_MB] = outcome.peak_memory_mb
    if outcome.padding_free is not None:  # what ran, beside what the config asked
        user[attrs.PADDING_FREE] = outcome.padding_free
    if outcome.metrics:
        system[attrs.SYSTEM_METRICS] = dict(outcome.metrics)
        value = _finite(outcome.metrics.get(metric))
        if value is not None:
            user[metric] = value
    if outcome.history:
        system[attrs.SYSTEM_HISTORY] = [dict(h) for h in outcome.history]
    if outcome.error:
        user[attrs.ERROR] = short_error(outcome.error)
        if user[attrs.ERROR] != outcome.error:
            system[attrs.SYSTEM_ERROR] = outcome.error
    oom = outcome.status == "oom" or (outcome.status == "killed" and outcome.oom_kind == "host")
    if oom:
        user.update({attrs.OOM: True, attrs.OOM_KIND: outcome.oom_kind or "real"})
        if outcome.phase:
            user[attrs.OOM_PHASE] = outcome.phase
        user[attrs.OUTCOME] = attrs.OUTCOME_OOM
    elif outcome.status == "complete" and metric in outcome.metrics:
        user[attrs.OUTCOME] = attrs.OUTCOME_COMPLETE
    elif outcome.status == "pruned":
        user[attrs.OUTCOME] = attrs.OUTCOME_PRUNED
    else:
        user[attrs.OUTCOME] = attrs.OUTCOME_FAILED
        if outcome.status == "complete":  # finished without the study's metric
            user[attrs.ERROR] = f"the objective returned no {metric!r} metric"
    return TrialRecord(user=user, system=system)
