"""Preflight: decide before loading the model whether a config can fit on the device."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from optuna.trial import FrozenTrial

from search.memory.device import DeviceInfo
from search.memory.device import format_bytes
from search.memory.estimate import MemoryEstimate
from search.memory.estimate import estimate_peak_memory
from search.memory.frontier import find_estimate_oom
from search.memory.frontier import find_frontier_oom
from search.record import attrs
from search.record.config import GRADIENT_CACHE_AUTO
from search.record.config import TrialConfig
from search.record.models import ModelInfo
from search.record.trial_record import config_of

__all__ = [
    "ESTIMATE_BAND",
    "PreflightDecision",
    "estimate_band",
    "preflight",
    "resolve_gradient_cache",
]

# The memory estimate's measured error band, by device kind: a trial's real peak is taken to be
# at least ``estimate x (1 - band)``, and only a config whose lowest plausible peak exceeds the
# free memory is skipped. Over-estimating silently removes configs that fit from the search
# for good, while an under-estimate costs one worst-case first step (seconds) to find out, so
# the preflight errs towards running. A config that fits is never skipped while estimate /
# measured <= 1 / (1 - band). CPU: 0.2 (up to 1.25): estimate / measured was 1.000-1.087 over
# the real all-MiniLM-L6-v2's measured grid points (bench/bench_estimate_real.py, BENCHMARKS.md
# "Memory estimate on real weights") and 1.035-1.056 on tiny replicas; the rest of the band is
# for what the grid does not cover (other architectures, bf16 autocast on real weights).
# Accelerators: not yet measured on a GPU (issue 3), a wider assumed band.
ESTIMATE_BAND: dict[str, float] = {"cpu": 0.2, "cuda": 0.3}
ACCELERATOR_BAND = ESTIMATE_BAND["cuda"]


def estimate_band(device_kind: str) -> float:
    """The estimate's error band on ``device_kind`` (``cpu``, ``cuda``, ``mps``...)."""
    return ESTIMATE_BAND.get(device_kind, ACCELERATOR_BAND)


@dataclass(frozen=True)
class PreflightDecision:
    """Whether to skip a trial for memory, and why.

    Args:
        skip: True when the trial should not run (it is recorded PRUNED with ``oom=True``).
        kind: ``predicted`` (the estimate does not fit), ``frontier`` (an earlier real OOM
            dominates it, or had an estimate no larger on this device) or None when it runs.
        reason: One line, e.g. ``estimate 91.2 GiB, at least 63.8 GiB (band 30%) > 40.0 GiB
            free``.
        estimate: The memory estimate (recorded on every trial).
        frontier_trial: Number of the trial that justified a frontier skip.
        band: The estimate's error band used (see :data:`ESTIMATE_BAND`).
        free_bytes: The free memory the estimate was compared with.
        config: The config the trial runs: ``cfg`` with a ``gradient_cache`` of ``auto``
            resolved (:func:`resolve_gradient_cache`); None when built without one.
    """

    skip: bool
    kind: str | None
    reason: str
    estimate: MemoryEstimate
    frontier_trial: int | None = None
    band: float = 0.0
    free_bytes: int = 0
    config: TrialConfig | None = None

    @property
    def lowest_bytes(self) -> int:
        """The estimate's lowest plausible value, ``estimate x (1 - band)``."""
        return int(self.estimate.total_bytes * (1.0 - self.band))


def resolve_gradient_cache(cfg: TrialConfig, arch: ModelInfo, device: DeviceInfo) -> TrialConfig:
    """``cfg`` with a ``gradient_cache`` of ``auto`` resolved from the memory estimate.

    Off when the plain batch's estimate fits the free memory (the cache then only costs a
    forward pass); else the largest mini-batch whose estimate fits, halving from the largest
    power of two below the batch down to 1 row (the smallest when none fits: the preflight
    then decides on that). Any other setting is returned unchanged.

    Example:
        >>> from search.memory.device import DeviceInfo
        >>> from search.record.models import MODELS
        >>> cfg = TrialConfig(model="bge-m3-ko", model_path="dragonkue/BGE-m3-ko",
        ...     batch_size=256, max_len=384, lr=2e-5, temperature=0.05, warmup_ratio=0.1,
        ...     weight_decay=0.01, epochs=1, amp=True, gradient_checkpointing=False,
        ...     hard_negatives=1, seed=0, device="cuda", train_path="t", eval_dir="e",
        ...     gradient_cache=GRADIENT_CACHE_AUTO)
        >>> gpu = DeviceInfo("cuda:0", "cuda:0 (24 GiB)", 24 * 2**30, 24 * 2**30)
        >>> resolve_gradient_cache(cfg, MODELS["bge-m3-ko"], gpu).gradient_cache
        32
    """
    if cfg.gradient_cache != GRADIENT_CACHE_AUTO:
        return cfg

    def fits(candidate: TrialConfig) -> bool:
        estimate = estimate_peak_memory(arch, candidate, device_type=device.kind)
        return estimate.total_bytes <= device.free_bytes

    plain = dataclasses.replace(cfg, gradient_cache=0)
    if fits(plain):
        return plain
    rows = 1 << max(cfg.batch_size - 1, 1).bit_length() - 1  # largest power of two < batch
    while rows > 1 and not fits(dataclasses.replace(cfg, gradient_cache=rows)):
        rows //= 2
    return dataclasses.replace(cfg, gradient_cache=rows)


def preflight(
    cfg: TrialConfig,
    arch: ModelInfo,
    device: DeviceInfo,
    trials: Sequence[FrozenTrial],
    *,
    use_estimate: bool = True,
    use_frontier: bool = True,
    band: float | None = None,
) -> PreflightDecision:
    """Check a config against the OOM frontier, then against the memory estimate.

    The frontier comes first: a measured OOM is stronger evidence than an estimate. It rules
    out a config that an earlier real OOM dominates (``find_frontier_oom``), then one estimated
    at least as high as a real OOM on this device, unless a trial so estimated trained
    (``find_estimate_oom``: the band learnt from the study). Every check reads only facts and
    the trial record, so a skip costs milliseconds. The estimate skips a config only when even
    its lowest plausible value, ``estimate x (1 - band)``, exceeds the free memory: when in
    doubt, the config runs.

    Args:
        cfg: The trial's effective config.
        arch: Facts of what would be loaded (``tiny_info`` for replicas).
        device: The device and the memory a trial may use on it.
        trials: Earlier trials of the study, for the frontier (its real OOMs, and the trials
            that trained: ``search.memory.feasible.PREFLIGHT_STATES``).
        use_estimate: Skip configs whose lowest plausible estimate exceeds the free memory.
        use_frontier: Skip configs that an earlier real OOM dominates.
        band: The estimate's error band, in [0, 1); default :func:`estimate_band` of the
            device's kind.

    Returns:
        The decision (with the estimate, whether or not it was used to skip), and the config
        the trial runs (``decision.config``: an ``auto`` gradient cache resolved).
    """
    band = estimate_band(device.kind) if band is None else band
    if not 0.0 <= band < 1.0:
        raise ValueError(f"band must be in [0, 1), but got {band=}.")
    cfg = resolve_gradient_cache(cfg, arch, device)
    estimate = estimate_peak_memory(arch, cfg, device_type=device.kind)
    if use_frontier:
        ruled_out = _frontier_reason(cfg, estimate, device, trials)
        if ruled_out is not None:
            oom, line = ruled_out
            return PreflightDecision(
                skip=True,
                kind="frontier",
                reason=line,
                estimate=estimate,
                frontier_trial=oom.number,
                band=band,
                free_bytes=device.free_bytes,
                config=cfg,
            )
    lowest = int(estimate.total_bytes * (1.0 - band))
    fits = lowest <= device.free_bytes
    reason = (
        f"estimate {format_bytes(estimate.total_bytes)}, at least {format_bytes(lowest)} "
        f"(band {band:.0%}) {'<=' if fits else '>'} {format_bytes(device.free_bytes)} free"
    )
    skip = use_estimate and not fits
    kind = "predicted" if skip else None
    return PreflightDecision(
        skip=skip,
        kind=kind,
        reason=reason,
        estimate=estimate,
        band=band,
        free_bytes=device.free_bytes,
        config=cfg,
    )


def _frontier_reason(
    cfg: TrialConfig, estimate: MemoryEstimate, device: DeviceInfo, trials: Sequence[FrozenTrial]
) -> tuple[FrozenTrial, str] | None:
    """The real OOM that rules ``cfg`` out, and the line that says why; None when none does."""
    oom = find_frontier_oom(trials, cfg, device.total_bytes, device_kind=device.kind)
    if oom is not None:
        old = config_of(oom) or {}
        memory = format_bytes(oom.user_attrs[attrs.DEVICE_MEMORY_MB] * 2**20)
        return oom, (
            f"trial {oom.number} ran out of memory at batch {old.get('batch_size')} x "
            f"max_len {old.get('max_len')} on {memory}; batch {cfg.batch_size} x max_len "
            f"{cfg.max_len} needs at least as much"
        )
    oom = find_estimate_oom(trials, estimate.total_mb, device.total_bytes, device_kind=device.kind)
    if oom is not None:
        memory = format_bytes(oom.user_attrs[attrs.DEVICE_MEMORY_MB] * 2**20)
        then = format_bytes(oom.user_attrs[attrs.MEMORY_ESTIMATE_MB] * 2**20)
        return oom, (
            f"trial {oom.number} ran out of memory on {memory} with an estimate of {then}; "
            f"this config is estimated at {format_bytes(estimate.total_bytes)} and no trial "
            f"estimated as high has trained"
        )
    return None
