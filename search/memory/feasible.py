"""The configs a worker's device can run: each model's ``(batch_size, max_len)`` pairs that pass
the preflight, for the sampler to draw among (``ConditionalSampler.feasible``).

A preflight skip is free (``search.worker.budget``), but a sampler that keeps proposing configs the
device cannot hold learns little: TPE files the skips in its worse group and may leave a model
untrained because its first draws were too large for the device, and the random startup spends
its draws on them. So before a trial samples, the worker asks the preflight
(``search.memory.preflight.preflight``: the OOM frontier, the estimate with its band, the estimate
of a real OOM on this device) about every pair the spec allows each model, with the trial's other
settings at the middle of their ranges (learning rate and the like do not change the peak), and
the sampler draws ``batch_size`` and ``max_len`` among the pairs that pass.

A pair passes either surely (its estimate fits the free memory) or only thanks to the
estimate's band (estimated above the free memory, but the estimate may be high: issue 10's rule
that a config which may fit is never skipped). The sampler draws only sure pairs while the model
has any, random draws and TPE's proposals alike: a border pair is a coin flip that costs a real
OOM when it loses, so it is left to the deliberate probes (a staged search's ``frontier`` seeds,
which start the big model at its largest shape no real OOM rules out; ``search refine``'s
neighbours; enqueued configs), which the preflight still lets run, and whose outcome teaches it
(a real OOM rules out the configs estimated as high: ``search.memory.frontier.find_estimate_oom``;
a border pair that trains makes every pair estimated as low sure). Where none of a
model's pairs passes, the model is drawn only when nothing else is left, and its trial is
skipped as before (recorded, free, counted against the skip bound): a space where nothing fits
still stops on the bound with its one line.

Workers on different devices share a study: each asks about its own device, so a 24 GiB worker
draws from its own region while an 80 GiB one draws larger configs.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search.memory.device import DeviceInfo
from search.memory.frontier import evidence
from search.memory.frontier import trained_estimate_mb
from search.memory.preflight import preflight
from search.record.config import TrialConfig
from search.record.models import ModelInfo

__all__ = ["FeasibleGrid", "PREFLIGHT_STATES", "feasible_grid", "feasibility"]

# ``{model: {(batch_size, max_len) the preflight lets run: True when it fits without the band}}``.
FeasibleGrid = Mapping[str, Mapping[tuple[int, int], bool]]
# Trials the preflight reads: real OOMs (PRUNED) and trials that trained (COMPLETE, PRUNED).
PREFLIGHT_STATES = (TrialState.PRUNED, TrialState.COMPLETE)


def feasible_grid(
    choices: Mapping[str, Mapping[str, Sequence[int]]],
    config_for: Callable[[str, int, int], TrialConfig],
    arch_of: Callable[[str], ModelInfo],
    device: DeviceInfo,
    trials: Sequence[FrozenTrial],
    *,
    use_estimate: bool = True,
    use_frontier: bool = True,
) -> dict[str, dict[tuple[int, int], bool]]:
    """Each model's ``(batch_size, max_len)`` pairs that the preflight would let run, each
    marked True when it surely fits: its estimate fits the free memory without the band, or a
    trial estimated at least as high has trained on a device of this kind with no more memory.

    Args:
        choices: ``{model: {"batch_size": ..., "max_len": ...}}`` under the spec's conditions.
        config_for: The config of a model at a batch size and length (other settings fixed).
        arch_of: The facts the preflight estimates a model from.
        device: This worker's device and the memory a trial may use on it.
        trials: The study's trials the preflight reads (:data:`PREFLIGHT_STATES`).
        use_estimate: Rule out pairs whose estimate does not fit (``--no-estimate``: off).
        use_frontier: Rule out pairs an earlier real OOM rules out.
    """
    trials = evidence(trials)  # the same answers from the few trials that matter
    proven = trained_estimate_mb(trials, device.total_bytes, device_kind=device.kind)
    grid: dict[str, dict[tuple[int, int], bool]] = {}
    for model, per in choices.items():
        arch = arch_of(model)
        grid[model] = {}
        for batch in per["batch_size"]:
            for max_len in per["max_len"]:
                decision = preflight(
                    config_for(model, batch, max_len),
                    arch,
                    device,
                    trials,
                    use_estimate=use_estimate,
                    use_frontier=use_frontier,
                )
                if not decision.skip:
                    estimate = decision.estimate
                    sure = estimate.total_bytes <= device.free_bytes or estimate.total_mb <= proven
                    grid[model][batch, max_len] = sure or not use_estimate
    return grid


def feasibility(
    choices: Mapping[str, Mapping[str, Sequence[int]]],
    config_for: Callable[[str, int, int], TrialConfig],
    arch_of: Callable[[str], ModelInfo],
    device: DeviceInfo,
    *,
    use_estimate: bool = True,
    use_frontier: bool = True,
) -> Callable[[optuna.Study], FeasibleGrid]:
    """The sampler's ``feasible`` hook: the study's current grid for this worker's device.

    Called once per trial (the sampler keeps the answer for the trial): one read of the study's
    finished trials, then arithmetic (the estimate reads facts, not weights).
    """
    memo: dict[str, ModelInfo] = {}

    def arch(model: str) -> ModelInfo:
        if model not in memo:
            memo[model] = arch_of(model)
        return memo[model]

    def grid(study: optuna.Study) -> FeasibleGrid:
        trials = study.get_trials(deepcopy=False, states=PREFLIGHT_STATES)
        return feasible_grid(
            choices,
            config_for,
            arch,
            device,
            trials,
            use_estimate=use_estimate,
            use_frontier=use_frontier,
        )

    return grid
