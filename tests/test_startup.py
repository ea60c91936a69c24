"""TPE's random startup counts trained trials only (``search.sampling.sampler``).

Preflight skips (PRUNED, ``oom_kind`` predicted/frontier) are free: many of them must not use up
the random startup, so TPE proposes nothing until ``n_startup_trials`` trials have trained.
A recording base sampler (a real TPE underneath) tells whether TPE was asked to propose.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import TPESampler
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search.record import attrs
from search.sampling.sampler import ConditionalSampler
from search.sampling.sampler import conditional_choices
from search.sampling.space import sample_params
from search.spec.load import load_spec
from search.spec.study_spec import shipped_spec_path

N_STARTUP = 4


class RecordingTPE(TPESampler):
    """TPE that counts the relative proposals it was asked for (non-empty search space)."""

    def __init__(self) -> None:
        super().__init__(n_startup_trials=N_STARTUP, multivariate=True, seed=0)
        self.relative_calls = 0

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        self.relative_calls += bool(search_space)
        return super().sample_relative(study, trial, search_space)


def _sampler_and_study() -> tuple[ConditionalSampler, RecordingTPE, optuna.Study, Any]:
    spec = load_spec(shipped_spec_path("ko-retrieval"))
    base = RecordingTPE()
    sampler = ConditionalSampler(base, conditional_choices(spec), 0, n_startup_trials=N_STARTUP)
    return sampler, base, optuna.create_study(direction="maximize", sampler=sampler), spec


def _skip(study: optuna.Study, spec: Any, kind: str) -> None:
    trial = study.ask()
    sample_params(trial, spec)
    trial.set_user_attr(attrs.OOM_KIND, kind)
    study.tell(trial, state=TrialState.PRUNED)


def _trained(study: optuna.Study, spec: Any, value: float) -> None:
    trial = study.ask()
    sample_params(trial, spec)
    study.tell(trial, value)


def test_skips_do_not_end_the_random_startup() -> None:
    sampler, base, study, spec = _sampler_and_study()
    for i in range(3 * N_STARTUP):  # far more skips than the startup count
        _skip(study, spec, "predicted" if i % 2 else "frontier")
    for i in range(N_STARTUP - 1):
        _trained(study, spec, 0.1 * i)
    assert sampler.in_startup(study)
    assert base.relative_calls == 0  # TPE never proposed: every value was drawn at random
    _trained(study, spec, 0.5)  # the last startup trial
    assert not sampler.in_startup(study)
    _trained(study, spec, 0.6)
    assert base.relative_calls == 1  # now TPE proposes


def test_pruned_and_real_oom_trials_count_as_trained() -> None:
    sampler, base, study, spec = _sampler_and_study()
    for i in range(N_STARTUP):
        trial = study.ask()
        sample_params(trial, spec)
        if i % 2:  # a real OOM is recorded PRUNED too, but it trained: it counts
            trial.set_user_attr(attrs.OOM_KIND, "real")
        study.tell(trial, state=TrialState.PRUNED)
    assert not sampler.in_startup(study)
    _trained(study, spec, 0.3)
    assert base.relative_calls == 1


def test_startup_keeps_each_models_choices() -> None:
    sampler, _, study, spec = _sampler_and_study()
    for _ in range(2 * N_STARTUP):
        _skip(study, spec, "predicted")
    for trial in study.trials:
        p = trial.params
        assert p["batch_size"] in spec.space.choices_for(p["model"])["batch_size"]
        assert p["max_len"] in spec.space.choices_for(p["model"])["max_len"]
    assert sampler.in_startup(study)
