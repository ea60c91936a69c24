"""Stages that learn instead of assume (issue 16): the frontier stage's two-way learning-rate
ladder and settings prior, its own TPE after the seeds, giving its share back when the big
model has not beaten the earlier stages, and refine's joint moves after a stall.

Crafted in-memory studies only (no training): the decisions are pure functions of the trials.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.distributions import FloatDistribution
from optuna.distributions import IntDistribution
from optuna.trial import TrialState
from test_stages import STAGED

from search.record import attrs
from search.sampling.refine import STALL
from search.sampling.refine import enqueue_refine
from search.sampling.refine import refine_candidates
from search.sampling.refine import stall_length
from search.sampling.sampler import make_sampler
from search.sampling.stages import MIN_LR_GAP
from search.sampling.stages import SETTINGS
from search.sampling.stages import StagePlan
from search.sampling.stages import current_stage
from search.sampling.stages import frontier_seeds
from search.sampling.stages import gives_back
from search.sampling.stages import lr_ladder
from search.sampling.stages import stage_draw
from search.spec.load import load_spec
from search.spec.study_spec import StudySpec

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search" / "studies" / "data" / "ko-demo"
SMALL = ("multilingual-minilm", "multilingual-e5-small")
LEARN = """  - {{name: baseline, models: [multilingual-minilm, multilingual-e5-small],
     n_trials: 3}}
  - {{name: big-safe, models: [bge-m3-ko], n_trials: 5, seed: frontier{extra}}}
{middle}  - {{name: refine, seed: top_k, top_k: 2}}"""
DISTS = {
    "model": CategoricalDistribution([*SMALL, "bge-m3-ko"]),
    "batch_size": IntDistribution(32, 128, log=True),
    "max_len": IntDistribution(128, 384, step=128),
    "lr": FloatDistribution(1e-5, 2e-4, log=True),
    "temperature": FloatDistribution(0.01, 0.1, log=True),
    "warmup_ratio": FloatDistribution(0.0, 0.2),
    "weight_decay": FloatDistribution(0.0, 0.1),
}


def _spec(tmp_path: Path, extra: str = ", seeds: 2", middle: str = "", n: int = 12) -> StudySpec:
    path = tmp_path / "learn.yaml"
    stages = LEARN.format(extra=extra, middle=middle)
    path.write_text(
        STAGED.format(n=n, train=DEMO / "train.jsonl", eval=DEMO, stages=stages), encoding="utf-8"
    )
    return load_spec(path)


def _config(model: str, batch: int = 64, length: int = 256, **over: Any) -> dict[str, Any]:
    return {"model": model, "model_path": model, "batch_size": batch, "max_len": length,
            "lr": 5e-5, "temperature": 0.03, "warmup_ratio": 0.1, "weight_decay": 0.01,
            "epochs": 1, "amp": False, "gradient_checkpointing": False, "hard_negatives": 0,
            "seed": 0, "device": "cpu", "train_path": "t", "eval_dir": "e",
            **over}  # fmt: skip


def _trial(
    stage: str,
    value: float | None,
    config: dict[str, Any],
    state: TrialState = TrialState.COMPLETE,
    number: int | None = None,
) -> optuna.trial.FrozenTrial:
    trial = optuna.trial.create_trial(
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        params={k: config[k] for k in DISTS},
        distributions=DISTS,
        user_attrs={attrs.STAGE: stage},
        system_attrs={attrs.SYSTEM_CONFIG: config},
    )
    if number is not None:
        trial.number = number
    return trial


def _config_for(model: str, batch: int, length: int) -> Any:
    from search.record.config import TrialConfig

    return TrialConfig.from_json(_config(model, batch, length))


def _numbered(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    for i, t in enumerate(trials):
        t.number = i
    return trials


# ------------------------------------------------------------------ the two-way ladder


@pytest.mark.parametrize("centre", [1e-5, 1.2e-5, 5e-5, 1.9e-4, 2e-4])
def test_the_ladder_goes_both_ways_and_never_repeats_a_rate(centre: float) -> None:
    rates = lr_ladder(centre, 1e-5, 2e-4, 3)
    assert len(rates) == 3
    assert all(1e-5 <= r <= 2e-4 for r in rates)
    # Every seed tries a rate of its own: at least a factor sqrt 2 from every other one.
    gaps = [abs(math.log(a / b)) for i, a in enumerate(rates) for b in rates[i + 1 :]]
    assert min(gaps) >= MIN_LR_GAP - 1e-9
    if centre <= 1.2e-5:  # at the floor: the ladder turns upwards instead of repeating 1e-5
        assert max(rates) > 2 * centre
    if centre >= 1.9e-4:  # at the ceiling: downwards
        assert min(rates) < centre / 3


@pytest.mark.parametrize("best_lr", [1e-5, 2e-4])
def test_frontier_seeds_at_the_range_ends_are_distinct(tmp_path: Path, best_lr: float) -> None:
    spec = _spec(tmp_path, extra=", seeds: 3")
    trials = _numbered(
        [_trial("baseline", 0.7 - 0.1 * i, _config(SMALL[1], lr=best_lr)) for i in range(3)]
    )
    seeds = frontier_seeds(
        spec, spec.stages[1], trials, config_for=_config_for, device_total_bytes=2**34
    )
    lrs = [s["lr"] for s in seeds]
    assert len(seeds) == 3 and len({round(math.log(x), 6) for x in lrs}) == 3
    assert best_lr in lrs and all(1e-5 <= x <= 2e-4 for x in lrs)


def test_seeds_take_settings_from_several_trials_and_differ_when_the_top_trials_agree(
    tmp_path: Path,
) -> None:
    spec = _spec(tmp_path, extra=", seeds: 3")
    big = spec.stages[1]
    kw: dict[str, Any] = {"config_for": _config_for, "device_total_bytes": 2**34}
    # Three top trials with different settings: the first seed takes the best's, the others
    # their centre (geometric mean of the temperatures, means of warm-up and weight decay).
    overs: list[dict[str, Any]] = [
        {"temperature": 0.02, "warmup_ratio": 0.05, "weight_decay": 0.02},
        {"temperature": 0.05, "warmup_ratio": 0.15, "weight_decay": 0.08},
        {"temperature": 0.03, "warmup_ratio": 0.0, "weight_decay": 0.0},
    ]
    trials = _numbered(
        [
            _trial("baseline", 0.8 - 0.1 * i, _config(SMALL[i % 2], **o))
            for i, o in enumerate(overs)
        ]
    )
    seeds = frontier_seeds(spec, big, trials, **kw)
    centre = {
        "temperature": pytest.approx((0.02 * 0.05 * 0.03) ** (1 / 3)),
        "warmup_ratio": pytest.approx(0.2 / 3),
        "weight_decay": pytest.approx(0.1 / 3),
    }
    assert [{k: s[k] for k in SETTINGS} for s in seeds] == [overs[0], centre, centre]
    # Top trials that share their settings (refine moved only the lr): the seeds still differ,
    # the best's settings moved jointly for the others.
    same = _numbered(
        [_trial("baseline", 0.8 - 0.1 * i, _config(SMALL[1], lr=5e-5 * (i + 1))) for i in range(3)]
    )
    seeds = frontier_seeds(spec, big, same, **kw)
    settings = [tuple(s[k] for k in SETTINGS) for s in seeds]
    assert len(set(settings)) == 3 and settings[0] == (0.03, 0.1, 0.01)
    for s in seeds:
        assert 0.01 <= s["temperature"] <= 0.1 and 0.0 <= s["warmup_ratio"] <= 0.2


# ------------------------------------------------------------------ after the seeds


def test_after_its_seeds_the_stage_draws_from_its_own_trials(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    big = spec.stages[1]
    # The baseline liked temperature 0.02; the big model's seeds did better at 0.06.
    trials = [_trial("baseline", 0.7, _config(SMALL[1], temperature=0.02)) for _ in range(3)]
    trials += [
        _trial("big-safe", 0.8, _config("bge-m3-ko", 64, 384, lr=2e-5, temperature=0.06)),
        _trial("big-safe", 0.75, _config("bge-m3-ko", 64, 384, lr=4e-5, temperature=0.03)),
    ]
    _numbered(trials)
    assert stage_draw(spec, big, trials[:3], seed=1) is None  # no trial of its own yet
    draws = [stage_draw(spec, big, trials, seed=s) for s in range(8)]
    assert all(d is not None for d in draws)
    for d in draws:
        assert d is not None
        assert (d["model"], d["batch_size"], d["max_len"]) == ("bge-m3-ko", 64, 384)
        assert 1e-5 <= d["lr"] <= 2e-4 and 0.01 <= d["temperature"] <= 0.1
    # It explores the settings (not one point), and deterministically under its seed.
    assert len({round(d["temperature"], 6) for d in draws if d}) > 1
    assert stage_draw(spec, big, trials, seed=3) == draws[3]

    # In a study: once the seeds are spent, the plan enqueues the stage's own draw.
    sampler = make_sampler(spec, seed=0)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for t in trials:
        study.add_trial(t)
    key = attrs.STUDY_STAGE_SEEDED + "big-safe"
    study._storage.set_study_system_attr(study._study_id, key, 2)  # both seeds enqueued
    plan = StagePlan(spec, sampler, 12, config_for=_config_for, device_total_bytes=2**34, seed=1)
    assert plan(study, study.get_trials()) == {attrs.STAGE: "big-safe"}
    (queued,) = study.get_trials(states=(TrialState.WAITING,))
    assert queued.system_attrs["fixed_params"] == stage_draw(spec, big, study.get_trials(), 1)


# ------------------------------------------------------------------ giving the budget back


def _history(big_values: list[float | None], base_best: float = 0.7) -> list[Any]:
    trials = [_trial("baseline", base_best - 0.05 * i, _config(SMALL[i % 2])) for i in range(3)]
    for v in big_values:
        state = TrialState.COMPLETE if v is not None else TrialState.PRUNED
        trials.append(_trial("big-safe", v, _config("bge-m3-ko", 64, 384), state))
    return _numbered(trials)


def test_the_big_stage_gives_its_share_back_when_it_has_not_beaten_the_baseline(
    tmp_path: Path,
) -> None:
    spec = _spec(tmp_path)  # big-safe: 5 trials, 2 seeds
    assert spec.stages[1].give_back is None  # default: on for a frontier stage
    # One seed in: not yet.
    assert current_stage(spec, _history([0.6]), 12).name == "big-safe"
    # Both seeds run, neither beats the baseline's 0.7: the stage ends, refine starts.
    lost = _history([0.6, None])
    assert gives_back(spec, 1, lost) and current_stage(spec, lost, 12).name == "refine"
    # The big model is best: the stage keeps its share.
    won = _history([0.6, 0.72])
    assert not gives_back(spec, 1, won) and current_stage(spec, won, 12).name == "big-safe"
    # A seed still running is not a result yet.
    running = _history([0.6])
    running.append(_trial("big-safe", None, _config("bge-m3-ko"), TrialState.RUNNING, 4))
    assert current_stage(spec, running, 12).name == "big-safe"
    # The opt-out keeps the whole share.
    kept = _spec(tmp_path, extra=", seeds: 2, give_back: false")
    assert current_stage(kept, lost, 12).name == "big-safe"


def test_a_given_back_share_goes_to_the_next_stage(tmp_path: Path) -> None:
    middle = "  - {name: mid, models: [multilingual-e5-small], n_trials: 2}\n"
    spec = _spec(tmp_path, middle=middle, n=14)
    lost = _history([0.6, 0.65])  # big-safe gave back 3 of its 5 trials
    assert current_stage(spec, lost, 14).name == "mid"
    mids = [_trial("mid", 0.5, _config(SMALL[1])) for _ in range(4)]
    # mid's share is its own 2 plus the 3 big-safe left: 4 spent, one to go.
    assert current_stage(spec, _numbered(lost + mids), 14).name == "mid"
    more = _numbered(lost + mids + [_trial("mid", 0.5, _config(SMALL[1]))])
    assert current_stage(spec, more, 14).name == "refine"


def test_every_worker_derives_the_same_stage_from_the_same_trials(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    for history in (_history([0.6]), _history([0.6, None]), _history([0.6, 0.72])):
        stages = []
        for worker in range(2):
            sampler = make_sampler(spec, seed=worker)
            study = optuna.create_study(direction="maximize", sampler=sampler)
            for t in history:
                study.add_trial(t)
            plan = StagePlan(
                spec, sampler, 12, config_for=_config_for, device_total_bytes=2**34, seed=worker
            )
            stages.append(plan(study, study.get_trials())[attrs.STAGE])
        assert stages[0] == stages[1] == current_stage(spec, history, 12).name


# ------------------------------------------------------------------ refine's joint moves


def test_refine_moves_several_settings_at_once_after_a_stall(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    best = _config(SMALL[1], 64, 256)
    lr, t = best["lr"], best["temperature"]
    # The best trial's single moves, all worse (the lr's by less on the way down, the
    # temperature's by less on the way up): refine's last three did not beat it.
    trials = [
        _trial("baseline", 0.70, best),
        _trial("baseline", 0.60, _config(SMALL[0])),
        _trial("refine", 0.69, _config(SMALL[1], 64, 256, lr=lr / 2)),
        _trial("refine", 0.62, _config(SMALL[1], 64, 256, lr=lr * 2)),
        _trial("refine", 0.64, _config(SMALL[1], 64, 256, temperature=t / 2)),
    ]
    before = _numbered(trials[:4])
    assert stall_length(before, "refine", maximize=True) == 2
    single = refine_candidates(before, spec, top_k=2, n=1, rng=random.Random(0), stage="refine")
    assert sum(single[0][k] != best[k] for k in ("lr", "temperature", "warmup_ratio")) == 1

    trials.append(_trial("big-safe", 0.68, _config(SMALL[1], 64, 256, temperature=t * 2)))
    stuck = _numbered(trials)
    assert stall_length(stuck, "refine", maximize=True) == STALL
    cands = refine_candidates(stuck, spec, top_k=2, n=1, rng=random.Random(0), stage="refine")
    (joint,) = cands
    # The first candidate moves the lr and the temperature together, each to the top of the
    # parabola through the best trial and its single moves: a bit lower lr, a bit higher
    # temperature, inside the steps that overshot.
    assert lr / 2 < joint["lr"] < lr and t < joint["temperature"] < 2 * t
    assert {k: joint[k] for k in ("model", "batch_size", "max_len")} == {
        "model": SMALL[1], "batch_size": 64, "max_len": 256
    }  # fmt: skip
    # Deterministic: the same trials and seed give the same candidates.
    again = refine_candidates(stuck, spec, top_k=2, n=1, rng=random.Random(0), stage="refine")
    assert again == cands
    # ``search refine`` (stage None: the trials it enqueued record stage ``refine``) too.
    study = optuna.create_study(direction="maximize")
    for tr in stuck:
        study.add_trial(tr)
    (queued,) = enqueue_refine(study, spec, top_k=2, n=1, seed=0)
    assert queued == joint


def test_a_new_best_ends_the_stall() -> None:
    trials = [_trial("baseline", 0.7, _config(SMALL[1]))]
    trials += [_trial("refine", 0.6, _config(SMALL[1], lr=1e-5 * (i + 1))) for i in range(3)]
    trials.append(_trial("refine", 0.75, _config(SMALL[1], lr=9e-5)))
    assert stall_length(_numbered(trials), "refine", maximize=True) == 0
    trials += [_trial("refine", 0.6, _config(SMALL[1], lr=1.5e-4))]
    assert stall_length(_numbered(trials), "refine", maximize=True) == 1
    pruned = _trial("refine", None, _config(SMALL[1], lr=1.7e-4), TrialState.PRUNED)
    assert stall_length(_numbered([*trials, pruned]), "refine", maximize=True) == 2
