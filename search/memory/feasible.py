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
draws from its own region while an 80 GiB one draws larger configs. A stage with ``conditions:
device`` has the grid ask about the space's full choices for its models
(``search.spec.stage_check.grid_choices_for``), so it widens to what each device fits. A
``frontier`` seed, in any stage, is a shape this worker's preflight lets run (``preflight_fits``).

With ``sampler.border_probability`` above 0, that share of trials draws among a model's border
pairs instead of its sure ones (``search.sampling.sampler``): the price is a real OOM when the
estimate was right, the gain a config the sure pairs never reach.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search.memory.device import DeviceInfo
from search.memory.frontier import evidence
from search.memory.frontier import trained_estimate_mb
from search.memory.preflight import PreflightDecision
from search.memory.preflight import preflight
from search.record.config import TrialConfig
from search.record.models import ModelInfo

__all__ = [
    "Decisions",
    "FeasibleGrid",
    "OFF_PEAK_FIELDS",
    "PREFLIGHT_STATES",
    "feasible_grid",
    "feasibility",
    "grid_decision",
    "preflight_fits",
]

# ``{model: {(batch_size, max_len) the preflight lets run: True when it fits without the band}}``.
FeasibleGrid = Mapping[str, Mapping[tuple[int, int], bool]]
# Trials the preflight reads: real OOMs (PRUNED) and trials that trained (COMPLETE, PRUNED).
PREFLIGHT_STATES = (TrialState.PRUNED, TrialState.COMPLETE)
# The preflight's answer for each pair the grid asked about: ``{(model, batch_size, max_len):
# (the config asked, its decision)}``, so a trial of that shape is not estimated again.
Decisions = dict[tuple[str, int, int], tuple[TrialConfig, PreflightDecision]]
# Settings that do not change the peak (``search.memory.frontier.dominates``): a trial's config
# that differs from the grid's only in these gets the grid's decision (``grid_decision``).
OFF_PEAK_FIELDS = (
    "lr",
    "temperature",
    "warmup_ratio",
    "weight_decay",
    "seed",
    "eval_every_steps",
    "eval_sample_queries",
    "save_dir",
)


def feasible_grid(
    choices: Mapping[str, Mapping[str, Sequence[int]]],
    config_for: Callable[[str, int, int], TrialConfig],
    arch_of: Callable[[str], ModelInfo],
    device: DeviceInfo,
    trials: Sequence[FrozenTrial],
    *,
    use_estimate: bool = True,
    use_frontier: bool = True,
    decisions: Decisions | None = None,
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
        decisions: Filled with each pair's config and decision (:func:`grid_decision`).
    """
    trials = evidence(trials)  # the same answers from the few trials that matter
    proven = trained_estimate_mb(trials, device.total_bytes, device_kind=device.kind)
    grid: dict[str, dict[tuple[int, int], bool]] = {}
    for model, per in choices.items():
        arch = arch_of(model)
        grid[model] = {}
        for batch in per["batch_size"]:
            for max_len in per["max_len"]:
                cfg = config_for(model, batch, max_len)
                decision = preflight(
                    cfg,
                    arch,
                    device,
                    trials,
                    use_estimate=use_estimate,
                    use_frontier=use_frontier,
                )
                if decisions is not None:
                    decisions[model, batch, max_len] = (cfg, decision)
                if not decision.skip:
                    estimate = decision.estimate
                    sure = estimate.total_bytes <= device.free_bytes or estimate.total_mb <= proven
                    grid[model][batch, max_len] = sure or not use_estimate
    return grid


def preflight_fits(
    cfg: TrialConfig,
    arch: ModelInfo,
    device: DeviceInfo,
    trials: Sequence[FrozenTrial],
    *,
    use_estimate: bool = True,
    use_frontier: bool = True,
) -> bool:
    """Whether the preflight lets ``cfg`` run on ``device`` given the study's ``trials`` (the
    grid's membership for one config: a frontier seed must pass it, sure or border)."""
    trials = evidence([t for t in trials if t.state in PREFLIGHT_STATES])
    decision = preflight(
        cfg, arch, device, trials, use_estimate=use_estimate, use_frontier=use_frontier
    )
    return not decision.skip


def grid_decision(decisions: Decisions, cfg: TrialConfig) -> PreflightDecision | None:
    """The grid's preflight decision for ``cfg``, else None (run the preflight).

    The grid asked about ``cfg``'s model, batch size and length with the other settings mid-range;
    its decision holds for ``cfg`` when the two configs differ only in :data:`OFF_PEAK_FIELDS`
    (the decision's config becomes ``cfg`` with the grid's resolved gradient cache).
    """
    hit = decisions.get((cfg.model, cfg.batch_size, cfg.max_len))
    if hit is None:
        return None
    asked, decision = hit
    if dataclasses.replace(cfg, **{f: getattr(asked, f) for f in OFF_PEAK_FIELDS}) != asked:
        return None
    resolved = decision.config
    if resolved is not None:
        resolved = dataclasses.replace(cfg, gradient_cache=resolved.gradient_cache)
    return dataclasses.replace(decision, config=resolved)


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
