"""Optuna's importances rank the effective model, batch size and max length.

Every trial samples the same parameter names (``search.sampling.space``), so the importance
evaluators see ``model``, ``batch_size`` and ``max_len`` in every trial; with the earlier
per-branch names (``batch_size.bge-m3-ko``, ...) they saw none of the batch sizes or lengths
together and ranked ``model`` 0.00. A fast synthetic score (``study.tell``, no training) that
depends strongly on the model, the batch size and the length, weakly on ``lr`` and not at all on
``weight_decay``.
"""

from __future__ import annotations

import math

import optuna
import pytest

from search.sampling.sampler import make_sampler
from search.sampling.space import sample_params
from search.spec.load import resolve_spec

N_TRIALS = 40
SHARED = ("model", "batch_size", "max_len")
BASE = {
    "bge-m3-ko": 0.8,
    "multilingual-e5-small": 0.7,
    "ko-simcse": 0.55,
    "multilingual-minilm": 0.4,
}


def _study(sampler: str = "tpe") -> optuna.Study:
    spec = resolve_spec("ko-retrieval", None)
    spec = spec.model_copy(update={"sampler": spec.sampler.model_copy(update={"type": sampler})})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(spec, seed=7))
    for model in spec.models:
        study.enqueue_trial({"model": model})
    for _ in range(N_TRIALS):
        trial = study.ask()
        p = sample_params(trial, spec)
        score = (
            BASE[p.model]
            + 0.05 * math.log2(p.batch_size / 32)
            + 0.1 * (p.max_len / 512)
            - 0.01 * abs(math.log10(p.lr) + 4.5)
        )
        study.tell(trial, score)
    return study


@pytest.fixture(scope="module")
def study() -> optuna.Study:
    return _study()


def test_every_trial_has_the_shared_parameters(study: optuna.Study) -> None:
    assert len(study.trials) == N_TRIALS
    for t in study.trials:
        assert set(SHARED) <= set(t.params), t.number
        assert not [name for name in t.params if "." in name], t.number


def test_default_importances_include_model_batch_size_and_max_len(study: optuna.Study) -> None:
    """Optuna 5's default evaluator (PED-ANOVA), the one optuna-dashboard shows.

    PED-ANOVA asks what sets the top 10% of trials apart from all trials; TPE soon samples
    mostly the best model, so the shared parameters rank low but present and non-zero.
    """
    importances = optuna.importance.get_param_importances(study)
    for name in SHARED:
        assert importances[name] > 0.0, importances


def test_fanova_ranks_model_batch_size_and_max_len_first() -> None:
    """fANOVA needs one distribution per name in every trial: the shared names have it.

    Over a random sampler's trials, so that every model is well represented (TPE soon samples
    mostly the best model, and which parameter then varies most depends on the seed).
    """
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    importances = optuna.importance.get_param_importances(_study("random"), evaluator=evaluator)
    top = sorted(importances, key=importances.__getitem__, reverse=True)[:3]
    assert top[0] == "model" and set(top) == set(SHARED), importances
