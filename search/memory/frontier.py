"""The OOM frontier: configs that an earlier real out-of-memory proves will not fit."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search.record import attrs
from search.record.config import GRADIENT_CACHE_AUTO
from search.record.config import TrialConfig
from search.record.trial_record import config_of
from search.record.trial_record import device_kind_of
from search.record.trial_record import is_oom

__all__ = [
    "dominates",
    "evidence",
    "find_estimate_oom",
    "find_frontier_oom",
    "trained_estimate_mb",
]

MIB = 1024**2
# OOM kinds that are measurements, not guesses: a frontier is only learnt from these.
REAL_OOM_KINDS = frozenset({"real", "host"})
# Estimates closer than this are the same estimate (two models' replicas at one shape differ by
# a few KiB of vocabulary); the estimate's own error is tens of MiB at the least.
SAME_ESTIMATE_MB = 1.0
_SAVERS = ("amp", "gradient_checkpointing")
_FINISHED = (TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE)


def _encoded_rows(config: dict[str, Any]) -> int | None:
    """Rows whose activations are in memory at once: the gradient cache's mini-batch, else the
    batch (None: an ``auto`` cache that was never resolved proves nothing)."""
    batch, cache = int(config["batch_size"]), int(config.get("gradient_cache", 0) or 0)
    if cache == GRADIENT_CACHE_AUTO:
        return None
    return min(cache, batch) if cache > 0 else batch


def dominates(cfg: TrialConfig, oom_config: dict[str, Any]) -> bool:
    """Whether ``cfg`` needs at least as much memory as the config that ran out of memory.

    The dominance rule: the same ``model`` and ``model_path`` (the same architecture and
    weights), ``batch_size``, ``max_len`` and ``hard_negatives`` each no smaller, and no memory
    saver (``amp``, ``gradient_checkpointing``) on in ``cfg`` that was off in the OOM config.
    With the gradient cache the activations follow the mini-batch, not the batch: the rows
    encoded at once (the cache's mini-batch, else the batch) must be no smaller too, so a
    cached config is never pruned because a plain one of the same batch ran out of memory
    (while a plain config is, by a cached OOM of a smaller or equal batch).
    Everything else (learning rate, temperature, epochs...) does not change the peak.

    Example:
        >>> base = dict(model="m", model_path="p", batch_size=64, max_len=256, lr=1e-5,
        ...     temperature=0.05, warmup_ratio=0.1, weight_decay=0.0, epochs=1, amp=True,
        ...     gradient_checkpointing=False, hard_negatives=0, seed=0, device="cuda",
        ...     train_path="t", eval_dir="e")
        >>> dominates(TrialConfig(**{**base, "max_len": 384}), base)
        True
        >>> dominates(TrialConfig(**{**base, "gradient_checkpointing": True}), base)
        False
        >>> dominates(TrialConfig(**{**base, "batch_size": 256, "gradient_cache": 32}), base)
        False

    Args:
        cfg: The config about to run.
        oom_config: The effective config of a trial that ran out of memory
            (``search.record.trial_record.config_of``).

    Returns:
        True when ``cfg`` is at least as large in every memory dimension.
    """
    try:
        if cfg.model != oom_config["model"] or cfg.model_path != oom_config["model_path"]:
            return False
        if cfg.batch_size < int(oom_config["batch_size"]):
            return False
        if cfg.max_len < int(oom_config["max_len"]):
            return False
        if cfg.hard_negatives < int(oom_config.get("hard_negatives", 0)):
            return False
        rows, oom_rows = _encoded_rows(dataclasses.asdict(cfg)), _encoded_rows(oom_config)
        if rows is None or oom_rows is None or rows < oom_rows:
            return False
        return all(not getattr(cfg, s) or bool(oom_config.get(s, False)) for s in _SAVERS)
    except (KeyError, TypeError, ValueError):
        return False  # a malformed record proves nothing


def find_frontier_oom(
    trials: Sequence[FrozenTrial],
    cfg: TrialConfig,
    device_total_bytes: int,
    *,
    device_kind: str | None = None,
) -> FrozenTrial | None:
    """The earliest trial whose real OOM proves that ``cfg`` will run out of memory too.

    A trial counts when it is finished, recorded ``oom=True`` with ``oom_kind`` ``real`` or
    ``host`` (not a predicted or frontier skip, so a wrong guess never spreads), ran on a device
    with the same or more memory (``device_memory_mb`` at least this device's total), and
    ``cfg`` :func:`dominates` its config (``search:config``, or the user attribute ``config``
    of older trials). Only the trial record is read: no model is loaded.

    Args:
        trials: Earlier trials of the study (any states; unfinished ones are ignored).
        cfg: The config about to run.
        device_total_bytes: Memory this trial may use (device total or the memory limit).
        device_kind: ``cuda`` / ``cpu``...; when given, OOMs on another kind of device (read
            from ``device_kind``, or parsed from ``device`` for older trials) are ignored.

    Returns:
        The justifying trial, or None.
    """
    device_mb = device_total_bytes / MIB
    best: FrozenTrial | None = None
    for t in trials:
        if t.state not in _FINISHED:
            continue
        ua = t.user_attrs
        if not _is_real_oom(ua):
            continue
        memory = ua.get(attrs.DEVICE_MEMORY_MB)
        if not isinstance(memory, (int, float)) or memory < device_mb * (1 - 1e-9):
            continue
        if device_kind is not None:
            kind = device_kind_of(ua)
            if kind is not None and kind != device_kind:
                continue
        config = config_of(t)
        if config is None or not dominates(cfg, config):
            continue
        if best is None or t.number < best.number:
            best = t
    return best


def _same_kind(user_attrs: dict[str, Any], device_kind: str | None) -> bool:
    kind = device_kind_of(user_attrs)
    return device_kind is None or kind is None or kind == device_kind


def find_estimate_oom(
    trials: Sequence[FrozenTrial],
    estimate_mb: float,
    device_total_bytes: int,
    *,
    device_kind: str | None = None,
) -> FrozenTrial | None:
    """The earliest real OOM whose memory estimate was at most ``estimate_mb`` (give or take
    :data:`SAME_ESTIMATE_MB`), on a device of this kind with the same or more memory, unless a
    trial trained with as large an estimate.

    The estimate orders configs of every model by memory, so it carries what a real OOM
    teaches further than :func:`dominates` (one model, larger in every dimension): when a
    config estimated at E ran out of memory, the estimate falls short on this device by at
    least the difference, and a config estimated at E or more (any model) will run out too. It
    is the preflight's band learnt from the study's own outcomes: at the start the band lets
    borderline configs run (an estimate may be high), and the first real OOM among them rules
    out the rest of the border on this device, instead of each model running out once.

    Trained evidence wins over the rule: when a trial trained (completed, or stopped by the
    pruner after its worst-case first step) on a device with no more memory, with an estimate
    of at least ``estimate_mb``, a config so estimated can fit, and nothing is returned.

    Args:
        trials: Earlier trials of the study (unfinished ones are ignored).
        estimate_mb: The memory estimate of the config about to run.
        device_total_bytes: Memory this trial may use (device total or the memory limit).
        device_kind: ``cuda`` / ``cpu``...; trials on another kind of device are ignored.

    Returns:
        The justifying trial, or None.
    """
    largest = _largest_trained(trials, device_total_bytes / MIB, device_kind)
    if largest is not None and largest >= estimate_mb - SAME_ESTIMATE_MB:
        return None  # a config estimated at least as large trained here
    device_mb = device_total_bytes / MIB
    best: FrozenTrial | None = None
    for t in trials:
        sized = _sized(t)
        if sized is None or not _is_real_oom(t.user_attrs):
            continue
        estimate, memory = sized
        at_most = estimate <= estimate_mb + SAME_ESTIMATE_MB
        if at_most and memory >= device_mb * (1 - 1e-9) and _same_kind(t.user_attrs, device_kind):
            best = t if best is None or t.number < best.number else best
    return best


def evidence(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials the frontier's two rules can use: every real OOM, and per device kind and
    memory the trained trial with the largest estimate (the only one the estimate rule needs).

    The same answers as the whole list, in a list as long as the study's real OOMs: the
    sampler asks about every pair of every model before each trial (``search.memory.feasible``).
    """
    ooms: list[FrozenTrial] = []
    largest: dict[tuple[str | None, float], FrozenTrial] = {}
    for t in trials:
        if t.state not in _FINISHED:
            continue
        if _is_real_oom(t.user_attrs):
            ooms.append(t)
        elif (sized := _sized(t)) is not None and _trained(t):
            key = (device_kind_of(t.user_attrs), sized[1])
            if key not in largest or sized[0] > largest[key].user_attrs[attrs.MEMORY_ESTIMATE_MB]:
                largest[key] = t
    return ooms + list(largest.values())


def trained_estimate_mb(
    trials: Sequence[FrozenTrial], device_total_bytes: int, *, device_kind: str | None = None
) -> float:
    """The largest memory estimate of a trial that trained (completed, or stopped by the
    pruner after its worst-case first step) on a device of this kind with no more memory: a
    config estimated no higher fits here (0 when none)."""
    return _largest_trained(trials, device_total_bytes / MIB, device_kind) or 0.0


def _largest_trained(
    trials: Sequence[FrozenTrial], device_mb: float, device_kind: str | None
) -> float | None:
    sizes = [
        sized[0]
        for t in trials
        if _trained(t) and (sized := _sized(t)) is not None
        if sized[1] <= device_mb and _same_kind(t.user_attrs, device_kind)
    ]
    return max(sizes, default=None)


def _sized(trial: FrozenTrial) -> tuple[float, float] | None:
    """A finished trial's ``(memory_estimate_mb, device_memory_mb)``, None without both."""
    ua = trial.user_attrs
    estimate, memory = ua.get(attrs.MEMORY_ESTIMATE_MB), ua.get(attrs.DEVICE_MEMORY_MB)
    if trial.state not in _FINISHED:
        return None
    if not isinstance(estimate, (int, float)) or not isinstance(memory, (int, float)):
        return None
    return float(estimate), float(memory)


def _trained(trial: FrozenTrial) -> bool:
    """Completed, or stopped by the pruner: past its worst-case first step, without OOM."""
    states = (TrialState.PRUNED, TrialState.COMPLETE)
    return trial.state in states and not is_oom(trial.user_attrs)


def _is_real_oom(user_attrs: dict[str, Any]) -> bool:
    """A measured OOM (``real`` / ``host``), not a predicted or frontier skip."""
    return is_oom(user_attrs) and user_attrs.get(attrs.OOM_KIND) in REAL_OOM_KINDS
