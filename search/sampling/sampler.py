"""Sampler and pruner of a study, built from the spec's ``sampler`` and ``pruner`` sections.

Every trial samples the same parameter names (``model``, ``batch_size``, ``max_len``, ``lr``,
...; see ``search.sampling.space``). ``batch_size`` and ``max_len`` are integers with the same
distribution in every trial, spanning the spec's full choices (stepped when the choices are
evenly spaced, e.g. max_len 128..512 step 128, else on a log scale, e.g. batch 32..256), and
``ConditionalSampler`` turns each proposal into one of the trial's model's choices
(bge-m3-ko: batch 32/64, max_len 256/384): TPE's proposal is rounded to the nearest allowed
choice, and without a proposal the value is drawn uniformly from the model's choices. No
trial is rejected or re-run for it.

TPE's random startup counts trained trials only: until ``n_startup_trials`` trials have
trained (COMPLETE or PRUNED, preflight skips excluded: ``search.record.counts.is_skip``), every
value is drawn at random (the conditions and stages still apply). Skips are free (they do not spend
the budget), so a space that mostly does not fit the device would otherwise use up the random
startup on skipped configs and start TPE without trained evidence. Once TPE models the
history, a skip (PRUNED without intermediate values) falls in TPE's worse group: a config that
does not fit is learnt as a bad one.

The device decides too: a worker sets ``ConditionalSampler.feasible`` (``search.memory.feasible``),
and ``batch_size`` / ``max_len`` are then drawn (or TPE's proposal rounded) among the pairs the
preflight would let run on that worker's device, and ``model`` among the models with at least
one such pair: a pair whose estimate fits without the band while the model has one (a border
pair, which fits only within the band, is left to the deliberate probes: big-safe's frontier
seeds, ``search refine``, enqueued configs). Skips then come only from what the grid cannot know
(a pair ruled out by another worker's OOM since the trial began, an enqueued config).

Border pairs with a small probability (``sampler.border_probability``, default 0): that share of
the trials whose model has both sure and border pairs draws ``batch_size`` / ``max_len`` (or
rounds TPE's proposal) among its border pairs instead. Whether a trial does is a coin of its own,
seeded by the sampler's seed and the trial's number, so it does not depend on which worker
samples it or in what order. The price is a real OOM when the estimate was right; the gain, a
best config at the border that no sure draw reaches (``bench/bench_oom_budget.py
--border-probability``).

A stage with ``conditions: device`` (``search.spec.stage_check``) lets its models draw any of the
space's ``batch_size`` / ``max_len`` choices, narrowed by the grid to what the worker's device
fits; a worker without a grid keeps them to the space's conditions.

Example:
    >>> import optuna
    >>> from search.sampling.space import sample_params
    >>> from search.spec.load import load_spec
    >>> from search.spec.study_spec import shipped_spec_path
    >>> spec = load_spec(shipped_spec_path("ko-retrieval"))
    >>> study = optuna.create_study(direction="maximize", sampler=make_sampler(spec, seed=1))
    >>> for _ in range(20):
    ...     trial = study.ask()
    ...     p = sample_params(trial, spec)
    ...     _ = study.tell(trial, 0.5)
    ...     assert p.batch_size in spec.space.choices_for(p.model)["batch_size"]
    >>> sorted(study.trials[-1].params)
    ['batch_size', 'lr', 'max_len', 'model', 'temperature', 'warmup_ratio', 'weight_decay']
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.distributions import CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.samplers import RandomSampler
from optuna.trial import TrialState

from search.record import attrs
from search.record.counts import is_skip
from search.sampling import pruners
from search.spec.space_check import CONDITIONAL_PARAMS
from search.spec.stage_check import DEVICE
from search.spec.stage_check import stage_choices
from storage import compat

if TYPE_CHECKING:
    from optuna.study import Study
    from optuna.trial import FrozenTrial

    from search.memory.feasible import FeasibleGrid
    from search.spec.study_spec import StudySpec

MODEL_PARAM = "model"
STAGE_ATTR = attrs.STAGE  # the trial's stage in a staged search (search.sampling.stages)
_FIXED_PARAMS = "fixed_params"  # Optuna's system attribute of an enqueued trial's values

# Trials that trained, unless a preflight skip (``is_skip``): they end the random startup.
_TRAINED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)

# {parameter: {model: the model's choices}} for every model.
Choices = Mapping[str, Mapping[str, Sequence[int]]]


def conditional_choices(spec: StudySpec) -> dict[str, dict[str, tuple[int, ...]]]:
    """Each model's ``batch_size`` and ``max_len`` choices under ``spec``'s conditions.

    >>> from search.spec.load import load_spec
    >>> from search.spec.study_spec import shipped_spec_path
    >>> shipped = conditional_choices(load_spec(shipped_spec_path("ko-retrieval")))
    >>> shipped["batch_size"]["bge-m3-ko"], shipped["max_len"]["ko-simcse"]
    ((32, 64), (128,))
    """
    out: dict[str, dict[str, tuple[int, ...]]] = {name: {} for name in CONDITIONAL_PARAMS}
    for model in spec.models:
        for name, choices in spec.space.choices_for(model).items():
            out[name][model] = tuple(choices)
    return out


def nearest_choice(value: float, choices: Sequence[int]) -> int:
    """The choice nearest to ``value`` on a log scale (ties go to the smaller, cheaper one).

    >>> nearest_choice(100, [32, 64, 128, 256]), nearest_choice(512, [256, 384])
    (128, 384)
    """
    return min(choices, key=lambda c: (abs(math.log(c) - math.log(max(value, 1e-9))), c))


@dataclass(frozen=True)
class _Pin:
    """The trial being sampled, the trials it sees and its feasible grid (``pinned``)."""

    trial_id: int
    trials: Sequence[FrozenTrial]
    grid: Callable[[], FeasibleGrid] | None


class ConditionalSampler(BaseSampler):
    """A sampler that keeps ``batch_size`` and ``max_len`` to each trial's model's choices.

    Proposals come from ``base`` (TPE: joint over every parameter, ``model`` included); a
    proposal of ``batch_size`` or ``max_len`` becomes the model's nearest choice
    (``nearest_choice``). Without a proposal (startup trials, random search, or a model not
    known yet) the value is drawn uniformly from the model's choices.

    In a staged search (``search.sampling.stages``) the trial's stage (its user attribute
    ``stage``, else ``stage``, set by the worker under the budget lock before it asks) narrows the
    choices further: ``model`` to the stage's models (a proposal outside them is dropped and
    drawn uniformly among them) and ``batch_size`` / ``max_len`` to the stage's conditions
    (``conditions: device``: the space's full choices, narrowed by the grid; without a grid, the
    space's conditions). The distributions stay the same in every stage.

    Args:
        base: The sampler that proposes values.
        choices: ``{parameter: {model: choices}}`` (``conditional_choices(spec)``).
        seed: Seed of the uniform draws.
        stages: ``{stage: {"model": models, parameter: {model: choices}}}``
            (``search.spec.stage_check.stage_choices(spec)``); None: a single-stage study.
        models: The only models this worker samples (``--skip-unavailable``: those whose
            weights are here), in every stage; None: all.
        n_startup_trials: Trained trials (skips excluded) before ``base`` proposes anything;
            until then every value is drawn at random.
        border_probability: The share of trials (per trial, seeded by ``seed`` and the trial's
            number) that draw among the model's border pairs instead of its sure ones.

    Attributes:
        feasible: Set by the worker (``search.memory.feasible.feasibility``): the study's grid of
            ``(batch_size, max_len)`` pairs per model that its device can run; the choices are
            narrowed to them (a model with none is drawn only when no model has any). None:
            no narrowing (no preflight, e.g. ``--no-estimate --no-frontier``).
    """

    def __init__(
        self,
        base: BaseSampler,
        choices: Choices,
        seed: int | None,
        stages: Mapping[str, Mapping[str, Any]] | None = None,
        models: Sequence[str] | None = None,
        n_startup_trials: int = 0,
        border_probability: float = 0.0,
    ) -> None:
        self._base = base
        self._border_p = border_probability
        # The border coins' seed: the sampler's, else one of this sampler's own.
        self._coin_seed = seed if seed is not None else random.SystemRandom().getrandbits(64)
        self._coins: dict[int, bool] = {}  # trial number: draws among its border pairs
        self._n_startup = n_startup_trials
        self._startup_done = False  # trained trials only grow: checked until reached
        self._choices = {name: dict(per) for name, per in choices.items()}
        self._random = RandomSampler(seed=seed)
        self._stages = dict(stages or {})
        # The stage of the trial being claimed (search.sampling.stages).
        self.stage: str | None = None
        self._models = tuple(models) if models is not None else None
        self._excluded: set[str] = set()  # models given up for this run (exclude)
        self.feasible: Callable[[Study], FeasibleGrid] | None = None
        self._grid_of: tuple[int, FeasibleGrid] | None = None  # (trial id, its grid)
        self._pin: _Pin | None = None  # the worker step's snapshot while it samples

    @contextmanager
    def pinned(
        self,
        trial_id: int,
        trials: Sequence[FrozenTrial],
        grid: Callable[[], FeasibleGrid] | None = None,
    ) -> Iterator[None]:
        """While the block samples trial ``trial_id``, read ``trials`` instead of the study.

        The worker's trial step (``search.worker.step``) read ``trials`` under the budget lock
        as it claimed the trial; the random-startup count and the feasible grid come from it
        (``grid``: the grid of those trials, computed once; None: ``feasible(study)``), and
        the base sampler (TPE) reads the study through ``storage.compat.pinned_study``, so
        sampling reads no trial list of its own.
        """
        self._pin = _Pin(trial_id, trials, grid)
        try:
            yield
        finally:
            self._pin = None

    def _study_view(self, study: Study) -> Study:
        """What the base sampler reads: while pinned, ``study`` with its trial list answered
        from the step's snapshot (``storage.compat.pinned_study``), else ``study``."""
        if self._pin is None:
            return study
        return compat.pinned_study(study, self._pin.trials)

    def _has_grid(self) -> bool:
        return self.feasible is not None or (self._pin is not None and self._pin.grid is not None)

    def _stage_of(self, trial: FrozenTrial) -> Mapping[str, Any] | None:
        name = trial.user_attrs.get(STAGE_ATTR) or self.stage
        return self._stages.get(name) if isinstance(name, str) else None

    def exclude(self, model: str) -> None:
        """Sample ``model`` no more (its trials keep failing to load it:
        ``search.worker.load_failures``); a trial whose model is fixed (enqueued) keeps it."""
        self._excluded.add(model)

    def stage_models(self, trial: FrozenTrial) -> tuple[str, ...] | None:
        """The models the trial's stage samples (of those allowed here), or None (any model).

        Models given up (``exclude``) are left out; a stage left without any samples among
        the other models allowed here.
        """
        stage = self._stage_of(trial)
        models = tuple(stage[MODEL_PARAM]) if stage is not None else None
        if self._models is not None:
            models = tuple(m for m in (models or self._models) if m in self._models)
            models = models or self._models
        if self._excluded:
            every = self._models or tuple(self._choices["batch_size"])
            kept = tuple(m for m in (models or every) if m not in self._excluded)
            models = kept or tuple(m for m in every if m not in self._excluded) or models
        return models

    def allowed(
        self, name: str, model: object, trial: FrozenTrial | None = None
    ) -> tuple[int, ...] | None:
        """The choices of ``name`` for ``model``, or None for an unconditional parameter."""
        stage = self._stage_of(trial) if trial is not None else None
        if stage is not None and isinstance(model, str) and model in stage.get(name, {}):
            # ``conditions: device`` widens only where a grid narrows to what the device fits.
            if stage.get("conditions") != DEVICE or self._has_grid():
                return tuple(stage[name][model])
        per_model = self._choices.get(name)
        if per_model is None or not isinstance(model, str) or model not in per_model:
            return None
        return tuple(per_model[model])

    def _grid(self, study: Study, trial: FrozenTrial) -> FeasibleGrid | None:
        """The feasible grid for ``trial`` (asked once per trial), or None without one."""
        pin = self._pin
        if pin is not None and pin.grid is not None and pin.trial_id == compat.trial_id(trial):
            return pin.grid()
        if self.feasible is None:
            return None
        if self._grid_of is None or self._grid_of[0] != compat.trial_id(trial):
            self._grid_of = (compat.trial_id(trial), self.feasible(study))
        return self._grid_of[1]

    def _pairs(
        self, study: Study, trial: FrozenTrial, model: object, sure: bool = True
    ) -> set[tuple[int, int]]:
        """``model``'s feasible ``(batch_size, max_len)`` pairs within its (stage's) choices;
        ``sure`` (what the sampler draws among): only those that fit without the estimate's
        band, when the model has any."""
        grid = self._grid(study, trial)
        batches = self.allowed("batch_size", model, trial)
        lengths = self.allowed("max_len", model, trial)
        if grid is None or not isinstance(model, str) or batches is None or lengths is None:
            return set()
        pairs = {
            pair: fits
            for pair, fits in grid.get(model, {}).items()
            if pair[0] in batches and pair[1] in lengths
        }
        if not sure:
            return set(pairs)
        sure_pairs = {pair for pair, fits in pairs.items() if fits}
        border = set(pairs) - sure_pairs
        if sure_pairs and border and self.border_trial(trial):
            return border
        return sure_pairs or border

    def border_trial(self, trial: FrozenTrial) -> bool:
        """Whether ``trial`` draws among its model's border pairs (``border_probability``):
        a coin of the trial's own, seeded by the sampler's seed and the trial's number."""
        if self._border_p <= 0:
            return False
        coin = self._coins.get(trial.number)
        if coin is None:
            rng = random.Random(f"border:{self._coin_seed}:{trial.number}")
            coin = self._coins[trial.number] = rng.random() < self._border_p
        return coin

    def feasible_models(
        self, study: Study, trial: FrozenTrial, models: Sequence[str] | None
    ) -> tuple[str, ...] | None:
        """Of ``models`` (None: all), those with a feasible pair; all of them when none has
        one (their trials are then skipped and counted against the skip bound)."""
        if not self._has_grid():
            return tuple(models) if models is not None else None
        every = tuple(models) if models is not None else tuple(self._choices["batch_size"])
        fitting = tuple(m for m in every if self._pairs(study, trial, m))
        return fitting or (tuple(models) if models is not None else None)

    def narrowed(
        self,
        name: str,
        model: object,
        study: Study,
        trial: FrozenTrial,
        batch_size: object = None,
    ) -> tuple[int, ...] | None:
        """``allowed`` narrowed to the sure pairs (``max_len``: at ``batch_size`` when given).

        Sure pairs when the model has any, else its border pairs; unchanged when it has no
        feasible pair (or none at that batch size): the trial then samples as without a grid,
        and the preflight decides.
        """
        allowed = self.allowed(name, model, trial)
        if allowed is None:
            return None
        # Sure pairs first, then any feasible pair, then the choices unchanged.
        sure, feasible = self._pairs(study, trial, model), self._pairs(study, trial, model, False)
        for pairs in (sure, feasible):
            if name == "batch_size":
                keep = {b for b, _ in pairs}
            else:
                keep = {m for b, m in pairs if batch_size is None or b == batch_size}
            if narrowed := tuple(c for c in allowed if c in keep):
                return narrowed
        return allowed

    def in_startup(self, study: Study) -> bool:
        """True while fewer than ``n_startup_trials`` trials have trained (skips excluded)."""
        if self._n_startup <= 0 or self._startup_done:
            return False
        if self._pin is not None:
            done = [t for t in self._pin.trials if t.state in _TRAINED_STATES]
        else:
            done = study.get_trials(deepcopy=False, states=_TRAINED_STATES)
        self._startup_done = sum(not is_skip(t) for t in done) >= self._n_startup
        return not self._startup_done

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        if self.in_startup(study):
            return {}
        return self._base.infer_relative_search_space(self._study_view(study), trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        params = self._base.sample_relative(self._study_view(study), trial, search_space)
        fixed = trial.system_attrs.get(_FIXED_PARAMS) or {}
        model = fixed.get(MODEL_PARAM, params.get(MODEL_PARAM))
        models = self.feasible_models(study, trial, self.stage_models(trial))
        out: dict[str, Any] = {}
        if models is not None and MODEL_PARAM not in fixed and model not in models:
            model = None  # outside the stage or the device: drawn among the others instead
        batch = fixed.get("batch_size")
        # batch_size before max_len: the lengths that fit depend on the batch size.
        for name in sorted(params, key=lambda n: n != "batch_size"):
            value = params[name]
            if name == MODEL_PARAM and model is None:
                continue
            if name not in self._choices:
                out[name] = value
                continue
            allowed = self.narrowed(name, model, study, trial, batch)
            if allowed is not None:  # else: sampled once the model is known
                out[name] = nearest_choice(value, allowed)
                if name == "batch_size":
                    batch = out[name]
        return out

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        if param_name == MODEL_PARAM:
            stage = self.stage_models(trial)
            models = self.feasible_models(study, trial, stage)
            narrowed = models is not None and len(models) < len(self._choices["batch_size"])
            if models is not None and (stage is not None or narrowed):
                return self._random.sample_independent(
                    study, trial, param_name, CategoricalDistribution(list(models))
                )
        model, batch = trial.params.get(MODEL_PARAM), trial.params.get("batch_size")
        allowed = self.narrowed(param_name, model, study, trial, batch)
        if allowed is None:
            base = self._random if self.in_startup(study) else self._base
            view = self._study_view(study)
            return base.sample_independent(view, trial, param_name, param_distribution)
        return self._random.sample_independent(
            study, trial, param_name, CategoricalDistribution(list(allowed))
        )

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._base.before_trial(study, trial)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._base.reseed_rng()
        self._random.reseed_rng()


def make_base_sampler(spec: StudySpec, *, seed: int | None = None) -> BaseSampler:
    """TPE over the whole space (``multivariate=True, group=True``) or random search.

    With shared names every trial has the same parameters, so multivariate TPE models them
    all jointly (``model`` with ``batch_size``, ``max_len``, ``lr``, ...); ``group=True`` still
    splits the history by parameter set where it differs (studies with per-branch names).
    """
    cfg = spec.sampler
    seed = cfg.seed if seed is None else seed
    if cfg.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        # ``group`` is marked experimental; the choice is deliberate (see README).
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            n_startup_trials=cfg.n_startup_trials,
            multivariate=cfg.multivariate,
            group=cfg.group,
            seed=seed,
            constant_liar=True,  # many workers: running trials count as pessimistic results
        )


def make_sampler(
    spec: StudySpec, *, seed: int | None = None, models: Sequence[str] | None = None
) -> ConditionalSampler:
    """The study's sampler: ``make_base_sampler`` kept to each model's choices (and to
    ``models`` when only some of the spec's are searched: ``--skip-unavailable``)."""
    if models is not None and list(models) == list(spec.models):
        models = None
    cfg_seed = spec.sampler.seed if seed is None else seed
    return ConditionalSampler(
        make_base_sampler(spec, seed=seed),
        conditional_choices(spec),
        cfg_seed,
        stage_choices(spec) if spec.stages else None,
        models,
        spec.sampler.n_startup_trials if spec.sampler.type != "random" else 0,
        spec.sampler.border_probability,
    )


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The study's pruner: :func:`search.sampling.pruners.make_pruner` (one implementation)."""
    return pruners.make_pruner(spec)
