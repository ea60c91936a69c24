"""Search in stages: the spec's ``stages:`` run in order on one study, one budget share each.

The team's playbook as a spec: ``baseline`` maps the space with the small models, ``big-safe``
tries the big model within its safe region (seeded at the largest shape the OOM frontier
learned so far allows, with a learning-rate ladder both ways around the baseline's best rate and
the settings of the baseline's top trials: ``frontier_seeds``; the study's sampler then draws the
stage's other trials, and when the big model has not beaten the earlier stages after its seeds
the stage gives its unspent share to the next one: ``gives_back``), ``refine`` explores around
the best configs so far (``search.sampling.refine``). Every trial records its stage (user
attribute ``stage``). The space stays the same in every stage (one distribution per parameter,
so TPE learns across stages); a stage only restricts what the sampler proposes
(``search.sampling.sampler.ConditionalSampler``: its models and its ``batch_size`` / ``max_len``
choices), as the space's conditions do.

Workers follow the same order without talking to each other: under the study's budget lock
(``search.worker.budget.claim_trial``) the current stage is derived from the study's trials, the
first stage whose budget share is not yet spent (trials that spend the budget, counted as the
study's budget counts them, ``search.record.counts.spent_count``) and that has not given it
back; the last stage runs until the study's budget is spent. Every worker derives the same stage
from the same trials (a pure function of them). A ``frontier`` stage's seeds are enqueued one
at a time, each when no trial is queued, under the same lock (a study system attribute counts
them), so a seed that runs out of memory moves the next ones to the next shape that fits; a
``top_k`` stage enqueues one config around the top K trials *so far* before each of its
trials, under the same lock (``StagePlan.refine_next``), so results that arrive meanwhile count.

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
import warnings
from collections.abc import Callable
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

from search.memory.frontier import find_frontier_oom
from search.record import attrs
from search.record.counts import is_skip
from search.record.counts import spent_count
from search.record.trial_record import config_of
from search.sampling.refine import refine_candidates
from search.sampling.refine import top_trials
from search.spec.stage_check import stage_choices
from search.spec.stage_check import stage_models
from storage import compat

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from search.record.config import TrialConfig
    from search.spec.study_spec import StageSection
    from search.spec.study_spec import StudySpec

# A frontier stage's seeds: the earlier stages' best learning rate times these, in this order
# (lower first, as bigger encoders fine-tune best at lower rates, then both ways);
# ``ladder_factors`` continues the pattern past them.
LR_LADDER = (0.5, 1.0, 0.25, 2.0, 0.125, 4.0)
# A rung within this log-distance (a factor of sqrt 2) of an earlier seed's rate, once clipped to
# the space, is passed over for the next rung: every seed tries a rate of its own.
MIN_LR_GAP = math.log(2.0) / 2
# What a frontier stage's seeds take over from the earlier stages' trials: the learning rate of
# the best one (the ladder's centre), the settings of the top ones (``SETTINGS``).
TRANSFER_PARAMS = ("lr", "temperature", "warmup_ratio", "weight_decay")
SETTINGS = ("temperature", "warmup_ratio", "weight_decay")
PRIOR_TOP = 3  # the earlier trials whose settings make the seeds' prior (``settings_prior``)
SHAPE = ("model", "batch_size", "max_len")  # what a stage draw takes from the stage's best


def stage_of(trial: FrozenTrial) -> str | None:
    """The stage a trial ran in (its user attribute), or None (a single-stage study)."""
    value = trial.user_attrs.get(attrs.STAGE)
    return str(value) if value is not None else None


def current_stage(spec: StudySpec, trials: Sequence[FrozenTrial], budget: int) -> StageSection:
    """The first stage whose budget share is not spent yet; else the last stage.

    A share is spent by the trials recorded in that stage that spend the study's budget
    (``search.record.counts.spent_count``). ``budget`` is the study's budget in force (it may
    differ from ``study.n_trials`` after ``--n-trials``): a stage's share never reaches past it.
    A stage that gives its share back (``gives_back``) is passed over, and what it left of its
    share goes to the next stage.
    """
    if not spec.stages:
        raise ValueError("the spec declares no stages")
    carry = 0
    shares = stage_shares(spec, budget)
    for index, (stage, share) in enumerate(zip(spec.stages[:-1], shares, strict=False)):
        own = [t for t in trials if stage_of(t) == stage.name]
        spent = spent_count(own)
        share += carry
        carry = 0
        if spent >= share:
            continue
        if gives_back(spec, index, trials):
            carry = share - spent
            continue
        return stage
    return spec.stages[-1]


def gives_back(spec: StudySpec, index: int, trials: Sequence[FrozenTrial]) -> bool:
    """Whether stage ``index`` ends early: it has run its seeds and not beaten the earlier stages.

    On for a stage with ``give_back: true``, and by default (``give_back`` unset) for a
    ``frontier`` stage: once the stage has ``seeds`` trials per model that finished (skips
    excluded), and its best completed trial is not better than the best completed trial of the
    stages before it (or it has none while they have one). A pure function of the trials, so
    every worker decides alike under the budget lock; a trial of the stage still running that
    later beats the earlier stages gives the stage back its unspent share.
    """
    stage = spec.stages[index]
    if not (stage.give_back if stage.give_back is not None else stage.seed == "frontier"):
        return False
    own = [t for t in trials if stage_of(t) == stage.name]
    settled = [t for t in own if t.state.is_finished() and not is_skip(t)]
    if len(settled) < stage.seeds * len(stage_models(spec, stage)):
        return False
    maximize = spec.study.direction == "maximize"
    earlier_names = {s.name for s in spec.stages[:index]}
    earlier = _best_value([t for t in trials if stage_of(t) in earlier_names], maximize)
    if earlier is None:
        return False
    mine = _best_value(own, maximize)
    better = gain(mine, earlier, maximize=maximize)
    return better is None or better <= 0


def _best_value(trials: Sequence[FrozenTrial], maximize: bool) -> float | None:
    best = top_trials(trials, 1, maximize=maximize)
    return float(best[0].value) if best and best[0].value is not None else None


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

    Settings, a prior rather than a fact: the best completed trial of the other stages
    (``transfer_source``) lends its learning rate, times the ladder's factors (``lr_ladder``:
    ``LR_LADDER`` both ways, clipped to the space, never within ``MIN_LR_GAP`` of an earlier
    seed's rate), since the learning rate is what transfers worst from small models to a big
    one, mostly downwards (bigger encoders fine-tune best at lower rates, e.g. 1e-5 to 3e-5 for
    XLM-R-large-sized models against 5e-5 to 1e-4 for MiniLM-sized ones) but not always. The
    first seed takes the best trial's temperature, warm-up and weight decay, the others the
    centre of the top trials' (``settings_prior``), so the seeds test the transfer instead of
    repeating one trial's settings. ``stage.seeds`` rungs per model (at most the stage's
    share); without such a trial, one seed per model with the shape only (the sampler draws
    the rest). Several models: the ladder turns round-robin over them.

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
    rates = lr_ladder(float(source["lr"]), space.lr.low, space.lr.high, stage.seeds)
    priors = settings_prior(spec, stage, trials, len(rates))
    if len(priors) < len(rates):  # the source's settings, where no prior could be built
        priors += [{k: float(source[k]) for k in SETTINGS}] * (len(rates) - len(priors))
    out: list[dict[str, Any]] = []
    for lr, settings in zip(rates, priors, strict=True):
        for shape in shapes:
            out.append({**shape, "lr": lr, **settings})
    return out


def stage_draw(
    spec: StudySpec,
    stage: StageSection,
    trials: Sequence[FrozenTrial],
    seed: int | None,
    *,
    fits: Callable[[str, int, int], bool] | None = None,
) -> dict[str, Any] | None:
    """A frontier stage's next config after its seeds: TPE on the stage's own trials only.

    The study's sampler models every trial, so once the seeds lead it proposes the big model's
    settings where the small models liked them (their trials are most of its history); this
    draws the learning rate, temperature, warm-up and weight decay from a TPE fed only the
    stage's trained trials (the seeds, which carry the transfer, and the draws since), at the
    shape of the stage's best trial. Deterministic under ``seed`` and the trials; None before
    the stage has a completed trial (the study's sampler draws then). ``fits(model, batch,
    max_len)``: this worker's preflight; the shape is the best trial's of those it lets run
    (workers on different devices: each at its own best; None when none fits).
    """
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    own = [
        t
        for t in trials
        if stage_of(t) == stage.name
        and t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and not is_skip(t)
        and all(isinstance(t.params.get(k), (int, float)) for k in TRANSFER_PARAMS)
    ]
    shapes = [t for t in own if fits is None or fits(*(t.params[k] for k in SHAPE))]
    best = top_trials(shapes, 1, maximize=spec.study.direction == "maximize")
    if not best:
        return None
    shape = {k: best[0].params[k] for k in SHAPE}
    dists = {}
    for k in TRANSFER_PARAMS:
        r = getattr(spec.space, k)
        dists[k] = FloatDistribution(r.low, r.high, log=r.log)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=(seed or 0) * 1000 + len(own),
            n_startup_trials=0,
            multivariate=True,
        )
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(verbosity, optuna.logging.WARNING))  # no "study created"
    try:
        local = optuna.create_study(
            storage=optuna.storages.InMemoryStorage(),
            direction=spec.study.direction,
            sampler=sampler,
        )
    finally:
        optuna.logging.set_verbosity(verbosity)
    for t in own:
        params = {k: min(max(float(t.params[k]), d.low), d.high) for k, d in dists.items()}
        local.add_trial(
            optuna.trial.create_trial(
                state=t.state,
                value=t.value if t.state == TrialState.COMPLETE else None,
                params=params,
                distributions=dict(dists),
                intermediate_values=dict(t.intermediate_values),
            )
        )
    return {**shape, **local.ask(dict(dists)).params}


def ladder_factors(limit: int = 12) -> list[float]:
    """``LR_LADDER``, then the same pattern further out (x1/32, x8, x1/64, ...)."""
    factors = list(LR_LADDER)
    down, up = min(LR_LADDER), max(LR_LADDER)
    while len(factors) < limit:
        down, up = down / 2, up * 2
        factors += [down, up]
    return factors[:limit]


def lr_ladder(centre: float, low: float, high: float, n: int) -> list[float]:
    """Up to ``n`` learning rates around ``centre``: its ``ladder_factors`` clipped to
    ``[low, high]``, each at least ``MIN_LR_GAP`` (log) from the ones before it.

    >>> [f"{x:.0e}" for x in lr_ladder(1e-5, 1e-5, 2e-4, 3)]  # at the floor: upwards
    ['1e-05', '2e-05', '4e-05']
    >>> [f"{x:.1e}" for x in lr_ladder(2e-4, 1e-5, 2e-4, 3)]  # at the ceiling
    ['1.0e-04', '2.0e-04', '5.0e-05']
    """
    out: list[float] = []
    for factor in ladder_factors():
        if len(out) >= n:
            break
        lr = min(max(centre * factor, low), high)
        if all(abs(math.log(lr / other)) >= MIN_LR_GAP - 1e-9 for other in out):
            out.append(lr)
    return out


def settings_prior(
    spec: StudySpec, stage: StageSection, trials: Sequence[FrozenTrial], n: int
) -> list[dict[str, float]]:
    """``n`` temperature / warm-up / weight-decay settings for a frontier stage's seeds.

    The first seed takes the best completed trial's of the other stages; the others the centre
    of the top ``PRIOR_TOP`` trials with distinct settings (each a temperature a factor sqrt 2,
    or a warm-up or weight decay an eighth of its range, from those before it): the geometric
    mean of their temperatures, the means of their warm-ups and weight decays, a robust guess
    where one trial's settings are noisy or belong to its model. When the top trials agree
    (one distinct setting), the best one's settings moved jointly (temperature x/÷ sqrt 2 with
    warm-up -/+ an eighth of its range) fill the rest.
    """
    maximize = spec.study.direction == "maximize"
    others = [t for t in trials if stage_of(t) != stage.name]
    space = spec.space
    spans = {
        "warmup_ratio": space.warmup_ratio.high - space.warmup_ratio.low,
        "weight_decay": space.weight_decay.high - space.weight_decay.low,
    }

    def distinct(a: dict[str, float], b: dict[str, float]) -> bool:
        if abs(math.log(a["temperature"] / b["temperature"])) >= MIN_LR_GAP - 1e-9:
            return True
        return any(abs(a[k] - b[k]) >= spans[k] / 8 - 1e-12 for k in spans if spans[k] > 0)

    out: list[dict[str, float]] = []
    for t in top_trials(others, len(others), maximize=maximize):
        if len(out) >= PRIOR_TOP:
            break
        params = {**(config_of(t) or {}), **t.params}
        if not all(isinstance(params.get(k), (int, float)) for k in SETTINGS):
            continue
        settings = {k: float(params[k]) for k in SETTINGS}
        if all(distinct(settings, o) for o in out):
            out.append(settings)
    if not out or n < 1:
        return []
    if len(out) > 1:
        mean = {
            "temperature": math.exp(sum(math.log(o["temperature"]) for o in out) / len(out)),
            "warmup_ratio": sum(o["warmup_ratio"] for o in out) / len(out),
            "weight_decay": sum(o["weight_decay"] for o in out) / len(out),
        }
        return [out[0]] + [dict(mean) for _ in range(n - 1)]
    centre = out[0]
    k = 1
    while len(out) < n:
        for sign in (1, -1):
            moved = dict(centre)
            moved["temperature"] = min(
                max(centre["temperature"] * 2.0 ** (sign * k / 2), space.temperature.low),
                space.temperature.high,
            )
            moved["warmup_ratio"] = min(
                max(centre["warmup_ratio"] - sign * k * spans["warmup_ratio"] / 8,
                    space.warmup_ratio.low),
                space.warmup_ratio.high,
            )  # fmt: skip
            if len(out) < n:
                out.append(moved)
        k += 1
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
        self._seed = seed
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
        share = stage_shares(self._spec, self._budget)[self._spec.stages.index(stage)]
        seeds = self.seeds(stage, trials)[: max(share, 1)]
        if done >= len(seeds):
            fits, config_for = self._fits, self._config_for
            draw = stage_draw(
                self._spec,
                stage,
                trials,
                self._seed,
                fits=None if fits is None else (lambda *s: fits(config_for(*s), trials)),
            )
            if draw is not None:
                self._enqueue(study, draw, stage)
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
