"""The conditional space over hundreds of trials, on SQLite and PostgreSQL.

The objective here is a fast fake (a function of the sampled parameters): this check is about
what the sampler proposes and what Optuna accepts, not about training.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search import attrs
from search.sampling import make_pruner
from search.sampling import make_sampler
from search.space import build_config
from search.space import sample_params
from search.spec import resolve_spec

N_TRIALS = 300


def _fake_objective(spec):  # type: ignore[no-untyped-def]
    def objective(trial: optuna.Trial) -> float:
        params = sample_params(trial, spec)
        cfg = build_config(spec, params, seed_offset=trial.number)
        trial.set_user_attr(attrs.CONFIG, cfg.to_json())
        trial.set_user_attr(attrs.BATCH_SIZE, cfg.batch_size)
        trial.set_user_attr(attrs.MAX_LEN, cfg.max_len)
        # A smooth fake score that prefers one model, a mid learning rate and long inputs.
        bonus = {"bge-m3-ko": 0.2, "multilingual-e5-small": 0.1}.get(cfg.model, 0.0)
        score = bonus + cfg.max_len / 5120 - abs(math.log10(cfg.lr) + 4.3) / 10
        trial.report(score, 0)
        if trial.number % 7 == 3:
            raise optuna.TrialPruned()
        return score

    return objective


def _run(storage: str | optuna.storages.BaseStorage) -> optuna.Study:
    spec = resolve_spec("ko-retrieval", None)
    study = optuna.create_study(
        study_name=f"space-{uuid.uuid4().hex[:8]}",
        storage=storage,
        direction="maximize",
        sampler=make_sampler(spec, seed=0),
        pruner=make_pruner(spec),
    )
    for model in spec.models:
        study.enqueue_trial({"model": model})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # catch=() : a distribution error must surface as an exception, not a FAIL state
    study.optimize(_fake_objective(spec), n_trials=N_TRIALS, catch=())
    return study


def _check(study: optuna.Study) -> None:
    trials = study.get_trials()
    assert len(trials) == N_TRIALS
    assert not [t for t in trials if t.state == TrialState.FAIL]
    seen_models = set()
    for t in trials:
        config = t.user_attrs[attrs.CONFIG]
        json.dumps(config)  # a JSON object
        for key in ("model", "batch_size", "max_len", "lr", "temperature", "epochs", "amp"):
            assert key in config
        assert "gradient_checkpointing" in config
        model = config["model"]
        seen_models.add(model)
        if model == "bge-m3-ko":
            assert config["batch_size"] in (32, 64), t.number
            assert config["max_len"] in (256, 384), t.number
        if model == "ko-simcse":
            assert config["max_len"] == 128, t.number
        assert config["batch_size"] in (32, 64, 128, 256)
        assert config["max_len"] in (128, 256, 384, 512)
    # the first four trials are the enqueued per-model baselines
    assert {t.user_attrs[attrs.CONFIG]["model"] for t in trials[:4]} == seen_models
    assert len(seen_models) == 4


def test_space_over_300_trials_on_sqlite(tmp_path: Path) -> None:
    _check(_run(f"sqlite:///{tmp_path / 'space.db'}"))


@pytest.mark.postgres
def test_space_over_300_trials_on_postgresql(pg_url: str) -> None:
    _check(_run(pg_url))


def test_dynamic_value_space_would_fail_with_a_shared_name() -> None:
    """The trap the branch names avoid: Optuna refuses changing choices for one name."""
    study = optuna.create_study()
    t0 = study.ask()
    t0.suggest_categorical("batch_size", [32, 64, 128, 256])
    study.tell(t0, 0.0)
    t1 = study.ask()
    with pytest.raises(ValueError, match="dynamic value space"):
        t1.suggest_categorical("batch_size", [32, 64])
