"""Sampler and pruner of a study, built from the spec's ``sampler`` and ``pruner`` sections.

Every trial samples the same parameter names (``model``, ``batch_size``, ``max_len``, ``lr``,
...; see ``search.space``). ``batch_size`` and ``max_len`` are categoricals over the spec's
full choices in every trial (Optuna requires identical choices for one name), and a model's
restricted choices (bge-m3-ko: batch 32/64, max_len 256/384) are kept by the sampler itself:
``ConditionalSampler`` wraps TPE (or random search) and never proposes a value outside the
trial's model's choices. No trial is rejected or re-run for it.

Example:
    >>> import optuna
    >>> from search.space import sample_params
    >>> from search.spec import load_spec, shipped_spec_path
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

import warnings
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.distributions import CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.samplers import RandomSampler

from search.space_check import CONDITIONAL_PARAMS

if TYPE_CHECKING:
    from optuna.study import Study
    from optuna.trial import FrozenTrial
    from optuna.trial import TrialState

    from search.spec import StudySpec

MODEL_PARAM = "model"
_FIXED_PARAMS = "fixed_params"  # Optuna's system attribute of an enqueued trial's values

# {parameter: {model: the model's choices}}, only where a model restricts the full choices.
Restrictions = Mapping[str, Mapping[str, Sequence[Any]]]


def restrictions(spec: StudySpec) -> dict[str, dict[str, tuple[int, ...]]]:
    """The per-model choices of ``spec`` that are narrower than the parameter's full choices.

    >>> from search.spec import load_spec, shipped_spec_path
    >>> shipped = restrictions(load_spec(shipped_spec_path("ko-retrieval")))
    >>> shipped["batch_size"], shipped["max_len"]
    ({'bge-m3-ko': (32, 64)}, {'ko-simcse': (128,), 'bge-m3-ko': (256, 384)})
    """
    full = {name: list(getattr(spec.space, name)) for name in CONDITIONAL_PARAMS}
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for model in spec.models:
        for name, choices in spec.space.choices_for(model).items():
            if list(choices) != full[name]:
                out.setdefault(name, {})[model] = tuple(choices)
    return out


class ConditionalSampler(BaseSampler):
    """A sampler that keeps each model's restricted choices under shared parameter names.

    Proposals come from ``base`` (TPE: joint over every parameter, ``model`` included). A
    proposal of a restricted parameter that the trial's model does not allow is not used: the
    value is then drawn uniformly from the model's choices (a random draw, as during TPE's
    startup trials). So every sampled value is one of the model's declared choices.

    Args:
        base: The sampler that proposes values.
        restricted: ``{parameter: {model: choices}}`` (``restrictions(spec)``).
        seed: Seed of the uniform draws.
    """

    def __init__(self, base: BaseSampler, restricted: Restrictions, seed: int | None) -> None:
        self._base = base
        self._restricted = {name: dict(per) for name, per in restricted.items()}
        self._random = RandomSampler(seed=seed)

    @property
    def base(self) -> BaseSampler:
        """The wrapped sampler."""
        return self._base

    def allowed(self, name: str, model: object) -> tuple[Any, ...] | None:
        """The choices of ``name`` for ``model``, or None when not restricted."""
        per_model = self._restricted.get(name)
        if per_model is None or not isinstance(model, str):
            return None
        choices = per_model.get(model)
        return None if choices is None else tuple(choices)

    def _fits(self, name: str, value: Any, model: object) -> bool:
        if name not in self._restricted:
            return True
        if model is None:  # the model is not known yet: let the parameter be sampled later
            return False
        allowed = self.allowed(name, model)
        return allowed is None or value in allowed

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._base.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        params = self._base.sample_relative(study, trial, search_space)
        fixed = trial.system_attrs.get(_FIXED_PARAMS) or {}
        model = fixed.get(MODEL_PARAM, params.get(MODEL_PARAM))
        return {k: v for k, v in params.items() if self._fits(k, v, model)}

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        value = self._base.sample_independent(study, trial, param_name, param_distribution)
        allowed = self.allowed(param_name, trial.params.get(MODEL_PARAM))
        if allowed is None or value in allowed:
            return value
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


def make_sampler(spec: StudySpec, *, seed: int | None = None) -> ConditionalSampler:
    """The study's sampler: ``make_base_sampler`` kept to each model's choices."""
    cfg_seed = spec.sampler.seed if seed is None else seed
    return ConditionalSampler(make_base_sampler(spec, seed=seed), restrictions(spec), cfg_seed)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The median pruner on the per-epoch metric, or none."""
    cfg = spec.pruner
    if cfg.type == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps
    )
