"""Search in stages: the spec's ``stages:`` run in order on one study, one budget share each.

The team's playbook as a spec: ``baseline`` maps the space with the small models, ``big-safe``
tries the big model within its safe region (seeded at the largest shape the OOM frontier
learned so far allows, with the baseline's best settings and a learning-rate ladder below the
baseline's best rate: ``frontier_seeds``), ``refine`` explores around the best configs so far
(``search.sampling.refine``). Every trial records its stage (user attribute ``stage``). The space
stays the same in every stage (one distribution per parameter, so TPE learns across stages); a
stage only restricts what the sampler proposes (``search.sampling.sampler.ConditionalSampler``: its
models and its ``batch_size`` / ``max_len`` choices), as the space's conditions do.

Workers follow the same order without talking to each other: under the study's budget lock
(``search.worker.budget.claim_trial``) the current stage is derived from the study's trials, the
first stage whose budget share is not yet spent (trials that spend the budget, counted as the
study's budget counts them, ``search.record.counts.spent_count``); the last stage runs until the
study's budget is spent. A ``frontier`` stage's seeds are enqueued one at a time, each when no
trial is queued, under the same lock (a study system attribute counts them), so a seed that runs
out of memory moves the next ones to the next shape that fits; a ``top_k``
stage enqueues one config around the top K trials *so far* before each of its trials, under
the same lock (``StagePlan.refine_next``), so results that arrive meanwhile count.

Example:
    >>> from search.spec.load import load_spec
    >>> from search.spec.study_spec import shipped_spec_path
    >>> spec = load_spec(shipped_spec_path("ko-retrieval"))
    >>> [s.name for s in spec.stages], current_stage(spec, [], 32).name
    (['baseline', 'big-safe', 'refine'], 'baseline')
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

from search.memory.frontier import find_frontier_oom
from search.record import attrs
from search.record.counts import spent_count
from search.record.trial_record import config_of
from search.sampling.refine import refine_candidates
from search.sampling.refine import top_trials
from search.spec.stage_check import stage_choices
from storage import compat

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from search.record.config import TrialConfig
    from search.spec.study_spec import StageSection
    from search.spec.study_spec import StudySpec

# A frontier stage's seeds: the earlier stages' best learning rate times these, middle first.
LR_LADDER = (0.5, 1.0, 0.25)
# What a frontier stage's seeds take over from the earlier stages' best trial.
TRANSFER_PARAMS = ("lr", "temperature", "warmup_ratio", "weight_decay")


def stage_of(trial: FrozenTrial) -> str | None:
    """The stage a trial ran in (its user attribute), or None (a single-stage study)."""
    value = trial.user_attrs.get(attrs.STAGE)
    return str(value) if value is not None else None


def current_stage(spec: StudySpec, trials: Sequence[FrozenTrial], budget: int) -> StageSection:
    """The first stage whose budget share is not spent yet; else the last stage.

    A share is spent by the trials recorded in that stage that spend the study's budget
    (``search.record.counts.spent_count``). ``budget`` is the study's budget in force (it may
    differ from ``study.n_trials`` after ``--n-trials``): a stage's share never reaches past it.
    """
    if not spec.stages:
        raise ValueError("the spec declares no stages")
    for stage, share in zip(spec.stages[:-1], stage_shares(spec, budget), strict=False):
        spent = spent_count([t for t in trials if stage_of(t) == stage.name])
        if spent < share:
            return stage
    return spec.stages[-1]


def stage_shares(spec: StudySpec, budget: int) -> list[int]:
    """Each stage's share of a study budget of ``budget`` trials, in order.

    The stages' ``n_trials`` are shares of ``study.n_trials``. A bigger budget (``--n-trials``,
    ``search refine``) goes to the last stage; a smaller one scales the shares down (each
    stage's end rounded up, at least one trial per stage while the budget lasts).

    >>> from search.spec.load import load_spec
    >>> from search.spec.study_spec import shipped_spec_path
    >>> spec = load_spec(shipped_spec_path("ko-retrieval"))
    >>> stage_shares(spec, 32), stage_shares(spec, 40), stage_shares(spec, 5)
    ([16, 6, 10], [16, 6, 18], [3, 1, 1])
    """
    total = spec.study.n_trials
    ends: list[int] = []
    cumulative = 0
    for stage in spec.stages[:-1]:
        cumulative += stage.n_trials or 0
        end = cumulative if budget >= total else math.ceil(budget * cumulative / total - 1e-9)
        previous = ends[-1] if ends else 0
        ends.append(min(max(end, previous + 1), budget))
    ends.append(max(budget, ends[-1] if ends else 0))
    return [end - (ends[i - 1] if i else 0) for i, end in enumerate(ends)]


def frontier_seeds(
    spec: StudySpec,
    stage: StageSection,
    trials: Sequence[FrozenTrial],
    *,
    config_for: Callable[[str, int, int], TrialConfig],
    device_total_bytes: int,
    fits: Callable[[TrialConfig], bool] | None = None,
) -> list[dict[str, Any]]:
    """What a ``frontier`` stage tries first: per model, its largest safe shape, with the best
    training settings of the earlier stages and a learning-rate ladder.

    Shape: per model of ``stage``, its largest ``batch_size`` x ``max_len`` no real OOM rules
    out (largest by batch x length; ties: the longer length). A shape that an earlier real OOM
    of the study rules out on this device (``search.memory.frontier.find_frontier_oom``) is passed
    over; a model whose every shape is ruled out gets no seed. ``config_for(model, batch,
    max_len)`` builds the effective config the frontier compares (the runner's
    ``build_config``). ``fits`` (the worker's preflight, ``search.memory.feasible.preflight_fits``;
    None: not asked) passes over a shape the worker's preflight would skip, e.g. beyond its
    device in a ``conditions: device`` stage.

    Settings: the best completed trial of the other stages (``transfer_source``) lends its
    temperature, warm-up and weight decay, which belong to the data and the loss more than to
    the model, and its learning rate times each factor of ``LR_LADDER`` (middle first), since
    the learning rate is what transfers worst from small models to a big one, and in a known
    direction: bigger encoders fine-tune best at lower rates (e.g. 1e-5 to 3e-5 for
    XLM-R-large-sized models against 5e-5 to 1e-4 for MiniLM-sized ones). Without such a
    trial, one seed per model with the shape only (the sampler draws the rest). Several
    models: the ladder turns round-robin over them.

    Returns:
        Fixed parameters to enqueue (``model``, ``batch_size``, ``max_len``, and with a
        source trial ``lr``, ``temperature``, ``warmup_ratio``, ``weight_decay``), in order.
    """
    choices = stage_choices(spec)[stage.name]
    shapes = []
    for model in choices["model"]:
        ordered = sorted(
            ((b, n) for b in choices["batch_size"][model] for n in choices["max_len"][model]),
            key=lambda s: (s[0] * s[1], s[1]),
            reverse=True,
        )
        for batch, length in ordered:
            cfg = config_for(model, batch, length)
            if find_frontier_oom(trials, cfg, device_total_bytes) is None and (
                fits is None or fits(cfg)
            ):
                shapes.append({"model": model, "batch_size": batch, "max_len": length})
                break
    source = transfer_source(spec, stage, trials)
    if source is None:
        return shapes
    space = spec.space
    base = {k: float(source[k]) for k in TRANSFER_PARAMS}
    out: list[dict[str, Any]] = []
    for factor in LR_LADDER:
        lr = min(max(base["lr"] * factor, space.lr.low), space.lr.high)
        for shape in shapes:
            seed = {**shape, **base, "lr": lr}
            if seed not in out:  # a clipped rung can repeat its neighbour
                out.append(seed)
    return out


def transfer_source(
    spec: StudySpec, stage: StageSection, trials: Sequence[FrozenTrial]
) -> dict[str, Any] | None:
    """The parameters of the best COMPLETE trial outside ``stage`` (None: there is none)."""
    maximize = spec.study.direction == "maximize"
    others = [t for t in trials if stage_of(t) != stage.name]
    for t in top_trials(others, len(others), maximize=maximize):
        params = {**(config_of(t) or {}), **t.params}
        if all(isinstance(params.get(k), (int, float)) for k in TRANSFER_PARAMS):
            return params
    return None


class StagePlan:
    """The claim hook of a staged run: under the budget lock, pick the stage and seed it.

    Called by ``search.worker.budget.claim_trial`` before it samples a fresh trial; sets the
    sampler's current stage (the restriction ``ConditionalSampler`` applies), enqueues the
    stage's next seed when none is queued, and returns the user attributes
    of the new trial (its stage). A popped enqueued or re-queued trial keeps the stage it was
    queued with. ``enqueued`` lists the ids of the trials the last call enqueued, so the claim
    takes them without reading the trial list again.

    Args:
        spec: The study spec (with ``stages``).
        sampler: The study's ``ConditionalSampler`` (its ``stage`` is set here).
        budget: The study's budget in force.
        config_for: ``(model, batch, max_len) -> TrialConfig`` for frontier checks.
        device_total_bytes: Memory a trial may use on this worker's device.
        seed: Seed of the refine draws.
        fits: ``(config, trials) -> bool``: whether this worker's preflight lets a frontier
            seed run (``frontier_seeds``); None: not asked.
    """

    def __init__(
        self,
        spec: StudySpec,
        sampler: Any,
        budget: int,
        *,
        config_for: Callable[[str, int, int], TrialConfig],
        device_total_bytes: int,
        seed: int | None = None,
        fits: Callable[[TrialConfig, Sequence[FrozenTrial]], bool] | None = None,
    ) -> None:
        self._spec = spec
        self._fits = fits
        self._sampler = sampler
        self._budget = budget
        self._config_for = config_for
        self._device_total_bytes = device_total_bytes
        self._rng = random.Random(seed)
        self.enqueued: list[int] = []  # ids of the trials the last call enqueued

    def __call__(self, study: optuna.Study, trials: Sequence[FrozenTrial]) -> dict[str, Any]:
        self.enqueued = []
        stage = current_stage(self._spec, trials, self._budget)
        self._sampler.stage = stage.name
        if stage.seed == "top_k":
            from optuna.trial import TrialState

            # One config at a time, around the top K *now*: results that arrived since (other
            # workers' trials of the earlier stage, this stage's own) count. A queued trial
            # (``search refine``, a leftover seed) runs first.
            if not any(t.state == TrialState.WAITING for t in trials):
                for params in self.refine_next(stage, trials):
                    self._enqueue(study, params, stage)
            return {attrs.STAGE: stage.name}
        if stage.seed == "frontier":
            self._seed_frontier(study, stage, trials)
        return {attrs.STAGE: stage.name}

    def _seed_frontier(
        self, study: optuna.Study, stage: StageSection, trials: Sequence[FrozenTrial]
    ) -> None:
        """Enqueue a frontier stage's next seed when none is queued (a study system attribute
        counts the seeds so far; True, from older studies: all done). One at a time, so a
        seed that runs out of memory moves the next ones to the next shape that fits."""
        from optuna.trial import TrialState

        key = attrs.STUDY_STAGE_SEEDED + stage.name
        storage, study_id = compat.study_storage(study), compat.study_id(study)
        done = storage.get_study_system_attrs(study_id).get(key, 0)
        if isinstance(done, bool) or not isinstance(done, int):
            return
        if any(t.state == TrialState.WAITING for t in trials):
            return
        seeds = self.seeds(stage, trials)
        if done >= len(seeds):
            return
        self._enqueue(study, seeds[done], stage)
        storage.set_study_system_attr(study_id, key, done + 1)

    def _enqueue(self, study: optuna.Study, params: dict[str, Any], stage: StageSection) -> None:
        self.enqueued.append(compat.enqueue_trial(study, params, {attrs.STAGE: stage.name}))

    def refine_next(
        self, stage: StageSection, trials: Sequence[FrozenTrial]
    ) -> list[dict[str, Any]]:
        """The next config of a ``top_k`` stage (none when nothing new is left around them).

        Round-robin over the top K: the stage's n-th trial starts with the n-th best.
        """
        done = sum(stage_of(t) == stage.name for t in trials)
        return refine_candidates(
            trials,
            self._spec,
            top_k=stage.top_k,
            n=1,
            rng=self._rng,
            stage=stage.name,
            device_total_bytes=self._device_total_bytes,
            start=done,
        )

    def seeds(self, stage: StageSection, trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
        """What a ``frontier`` stage enqueues when it starts (``frontier_seeds``)."""
        fits = self._fits
        return frontier_seeds(
            self._spec,
            stage,
            trials,
            config_for=self._config_for,
            device_total_bytes=self._device_total_bytes,
            fits=None if fits is None else (lambda cfg: fits(cfg, trials)),
        )


def gain(best: float | None, earlier: float | None, *, maximize: bool) -> float | None:
    """How much ``best`` improves on ``earlier`` (positive: better), or None if either is missing.

    >>> gain(0.71, 0.70, maximize=True) > 0, gain(0.5, 0.4, maximize=False) < 0
    (True, True)
    """
    if best is None or earlier is None or not (math.isfinite(best) and math.isfinite(earlier)):
        return None
    return best - earlier if maximize else earlier - best
