"""Preflight: decide before loading the model whether a config can fit on the device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from optuna.trial import FrozenTrial

from search import attrs
from search.config import TrialConfig
from search.device import DeviceInfo
from search.device import format_bytes
from search.frontier import find_frontier_oom
from search.memory_estimate import MemoryEstimate
from search.memory_estimate import estimate_peak_memory
from search.models import ModelInfo
from search.trial_record import config_of

__all__ = ["PreflightDecision", "preflight"]


@dataclass(frozen=True)
class PreflightDecision:
    """Whether to skip a trial for memory, and why.

    Args:
        skip: True when the trial should not run (it is recorded PRUNED with ``oom=True``).
        kind: ``predicted`` (the estimate does not fit), ``frontier`` (an earlier real OOM
            dominates it) or None when it runs.
        reason: One line, e.g. ``estimate 91.2 GiB > 0.90 x 79.1 GiB free``.
        estimate: The memory estimate (recorded on every trial).
        frontier_trial: Number of the trial that justified a frontier skip.
    """

    skip: bool
    kind: str | None
    reason: str
    estimate: MemoryEstimate
    frontier_trial: int | None = None


def preflight(
    cfg: TrialConfig,
    arch: ModelInfo,
    device: DeviceInfo,
    trials: Sequence[FrozenTrial],
    *,
    use_estimate: bool = True,
    use_frontier: bool = True,
    margin: float = 0.9,
) -> PreflightDecision:
    """Check a config against the OOM frontier, then against the memory estimate.

    The frontier comes first: a measured OOM is stronger evidence than an estimate. Both
    checks read only facts and the trial record, so a skip costs milliseconds.

    Args:
        cfg: The trial's effective config.
        arch: Facts of what would be loaded (``tiny_info`` for replicas).
        device: The device and the memory a trial may use on it.
        trials: Earlier trials of the study, for the frontier.
        use_estimate: Skip configs whose estimate exceeds ``margin`` x the free memory.
        use_frontier: Skip configs that an earlier real OOM dominates.
        margin: Share of the free memory a trial may plan to use.

    Returns:
        The decision (with the estimate, whether or not it was used to skip).
    """
    if not 0.0 < margin <= 1.0:
        raise ValueError(f"margin must be in (0, 1], but got {margin=}.")
    estimate = estimate_peak_memory(arch, cfg, device_type=device.kind)
    if use_frontier:
        oom = find_frontier_oom(trials, cfg, device.total_bytes, device_kind=device.kind)
        if oom is not None:
            old = config_of(oom) or {}
            return PreflightDecision(
                skip=True,
                kind="frontier",
                reason=(
                    f"trial {oom.number} ran out of memory at batch {old.get('batch_size')} x "
                    f"max_len {old.get('max_len')} on "
                    f"{format_bytes(oom.user_attrs[attrs.DEVICE_MEMORY_MB] * 2**20)}; "
                    f"batch {cfg.batch_size} x max_len {cfg.max_len} needs at least as much"
                ),
                estimate=estimate,
                frontier_trial=oom.number,
            )
    budget = margin * device.free_bytes
    if use_estimate and estimate.total_bytes > budget:
        return PreflightDecision(
            skip=True,
            kind="predicted",
            reason=(
                f"estimate {format_bytes(estimate.total_bytes)} > {margin:.2f} x "
                f"{format_bytes(device.free_bytes)} free"
            ),
            estimate=estimate,
        )
    return PreflightDecision(
        skip=False,
        kind=None,
        reason=(
            f"estimate {format_bytes(estimate.total_bytes)} <= {margin:.2f} x "
            f"{format_bytes(device.free_bytes)} free"
        ),
        estimate=estimate,
    )
