"""The conditional space over hundreds of trials, on SQLite and PostgreSQL.

Every trial carries the same parameter names with the effective values (``search.sampling.space``);
the conditions hold because the study's sampler keeps them (``search.sampling.sampler``).

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
from optuna.distributions import IntDistribution
from optuna.trial import TrialState
from typer.testing import CliRunner

from search.cli import app
from search.record import attrs
from search.sampling.sampler import make_pruner
from search.sampling.sampler import make_sampler
from search.sampling.space import build_config
from search.sampling.space import sample_params
from search.spec.load import load_spec
from search.spec.load import resolve_spec
from search.spec.space_check import check_stored_space
from search.spec.space_check import compare_stored_space
from search.spec.space_check import optuna_conflicts
from search.spec.study_spec import SpecError
from search.spec.study_spec import StudySpec
from search.spec.study_spec import shipped_spec_path

N_TRIALS = 150
SHARED_NAMES = (
    "model",
    "batch_size",
    "max_len",
    "lr",
    "temperature",
    "warmup_ratio",
    "weight_decay",
)


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
        # the shared names, with the effective values, in every trial
        assert sorted(t.params) == sorted(SHARED_NAMES), t.number
        for key in ("model", "batch_size", "max_len", "lr", "temperature"):
            assert t.params[key] == config[key], (t.number, key)
        assert t.distributions["batch_size"] == IntDistribution(32, 256, log=True)
        assert t.distributions["max_len"] == IntDistribution(128, 512, step=128)
    # the first four trials are the enqueued per-model baselines
    assert {t.user_attrs[attrs.CONFIG]["model"] for t in trials[:4]} == seen_models
    assert len(seen_models) == 4


def test_space_over_150_trials_on_sqlite(tmp_path: Path) -> None:
    _check(_run(f"sqlite:///{tmp_path / 'space.db'}"))


@pytest.mark.postgres
def test_space_over_150_trials_on_postgresql(pg_url: str) -> None:
    _check(_run(pg_url))


def test_tpe_proposals_are_used_not_replaced() -> None:
    """After the startup trials TPE's joint proposal decides the restricted parameters.

    The sampler redraws a restricted value only when TPE proposed one the model does not
    allow; if that were the common case the shared names would teach TPE nothing.
    """
    spec = resolve_spec("ko-retrieval", None)
    sampler = make_sampler(spec, seed=3)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kept = 0
    for _ in range(80):
        trial = study.ask()
        p = sample_params(trial, spec)
        # relative_params: TPE's joint proposal, less what the sampler did not keep
        kept += trial.number >= 8 and trial.relative_params.get("batch_size") == p.batch_size
        bonus = {"bge-m3-ko": 0.3}.get(p.model, 0.0)
        study.tell(trial, bonus + p.max_len / 1000 + p.batch_size / 1000)
    assert kept > 0.8 * 72


def test_enqueued_value_outside_the_conditions_is_refused() -> None:
    spec = resolve_spec("ko-retrieval", None)
    study = optuna.create_study(sampler=make_sampler(spec, seed=0))
    study.enqueue_trial({"model": "bge-m3-ko", "batch_size": 256})
    with pytest.raises(ValueError, match="batch_size 256 is not one of bge-m3-ko's choices"):
        sample_params(study.ask(), spec)


def test_a_sampler_without_the_conditions_falls_back_to_branch_names() -> None:
    """A plain Optuna sampler cannot keep per-model choices: every model uses branch names."""
    spec = resolve_spec("ko-retrieval", None)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for model in spec.models:
        for _ in range(6):
            study.enqueue_trial({"model": model})
    for _ in range(24):
        trial = study.ask()
        p = sample_params(trial, spec)
        study.tell(trial, 0.0)
        params = study.trials[trial.number].params
        assert "batch_size" not in params and "max_len" not in params
        assert params[f"batch_size.{p.model}"] == p.batch_size
        assert p.batch_size in spec.space.choices_for(p.model)["batch_size"]
        if p.model == "ko-simcse":  # one choice: not sampled
            assert p.max_len == 128 and "max_len.ko-simcse" not in params
        else:
            assert params[f"max_len.{p.model}"] == p.max_len
        if p.model == "bge-m3-ko":
            assert p.batch_size in (32, 64) and p.max_len in (256, 384)


def test_dynamic_value_space_would_fail_with_a_shared_name() -> None:
    """Why the shared names are not categoricals: Optuna refuses changing choices."""
    study = optuna.create_study()
    t0 = study.ask()
    t0.suggest_categorical("batch_size", [32, 64, 128, 256])
    study.tell(t0, 0.0)
    t1 = study.ask()
    with pytest.raises(ValueError, match="dynamic value space"):
        t1.suggest_categorical("batch_size", [32, 64])


# ------------------------------------------------- existing studies (search.spec.space_check)


def _legacy_study(url: str, spec: StudySpec) -> None:
    """A study as the per-branch version left it: branch parameter names, the spec stored."""
    study = optuna.create_study(storage=url, study_name="ko-retrieval", direction="maximize")
    study.set_user_attr(attrs.STUDY_SPEC, spec.public_dict())
    trial = study.ask()
    trial.suggest_categorical("model", list(spec.models))
    trial.suggest_categorical("batch_size.bge-m3-ko", [32, 64])
    trial.suggest_categorical("max_len.bge-m3-ko", [256, 384])
    study.tell(trial, 0.5)


def test_a_study_with_branch_names_is_refused_in_one_line(tmp_path: Path) -> None:
    spec_path = shipped_spec_path("ko-retrieval")
    db = tmp_path / "s.db"
    url = f"sqlite:///{db}"
    _legacy_study(url, load_spec(spec_path))
    result = CliRunner().invoke(
        app, ["run", "--spec", str(spec_path), "--storage", url, "--n-trials", "2"]
    )
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    line = " ".join(result.output.split())
    assert len(lines) <= 3, result.output  # one message (wrapped at most by the console)
    assert "per-model parameter names (batch_size.bge-m3-ko, max_len.bge-m3-ko)" in line
    assert "--study-name" in line and "--force-space" in line
    assert len(optuna.load_study(study_name="ko-retrieval", storage=url).trials) == 1


def test_force_space_continues_a_branch_named_study_once(tmp_path: Path) -> None:
    spec = load_spec(shipped_spec_path("ko-retrieval"))
    url = f"sqlite:///{tmp_path / 's.db'}"
    _legacy_study(url, spec)
    with pytest.raises(SpecError, match="per-model parameter names"):
        check_stored_space(url, "ko-retrieval", spec, force=False)
    check_stored_space(url, "ko-retrieval", spec, force=True)
    study = optuna.load_study(
        study_name="ko-retrieval", storage=url, sampler=make_sampler(spec, seed=0)
    )
    trial = study.ask()
    p = sample_params(trial, spec)
    study.tell(trial, 0.4)
    assert study.trials[-1].params["batch_size"] == p.batch_size
    check_stored_space(url, "ko-retrieval", spec, force=False)  # has shared names now


def test_changed_conditions_are_no_longer_an_optuna_conflict(tmp_path: Path) -> None:
    """The sampler keeps conditions, so a study can take new ones with --force-space."""
    spec = load_spec(shipped_spec_path("ko-retrieval"))
    stored = spec.public_dict()
    stored["space"]["conditions"]["bge-m3-ko"]["batch_size"] = [32]
    assert optuna_conflicts(stored, spec) == []
    with pytest.raises(SpecError, match="pass --force-space"):
        compare_stored_space("s", stored, spec, force=False)
    assert compare_stored_space("s", stored, spec, force=True)
    stored["space"]["batch_size"] = [32, 64, 128]  # another range, still a log scale
    assert optuna_conflicts(stored, spec) == []
    stored["space"]["batch_size"] = [32, 64, 96, 128]  # evenly spaced: stepped, not log
    assert optuna_conflicts(stored, spec) == ["batch_size (log scale)"]
