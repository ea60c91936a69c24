"""Search in stages: the spec's ``stages:``, the stage-restricted sampler, a staged run.

The staged run is the real ``search run`` on SQLite with tiny replicas and a fake objective
(``tests/fixtures/stage_objective.py``: no training, a score that depends on the config, and a
real-OOM record for bge-m3-ko at batch 64 x 384), so three stages finish in seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
from _cli import run_search
from optuna.trial import TrialState

from search.observe.report import study_report
from search.record import attrs
from search.sampling.sampler import make_sampler
from search.sampling.space import sample_params
from search.sampling.stages import current_stage
from search.sampling.stages import stage_shares
from search.spec.load import load_spec
from search.spec.stage_check import stage_choices
from search.spec.study_spec import SpecError
from search.spec.study_spec import shipped_spec_path
from storage import create_storage

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
DEMO = ROOT / "search" / "studies" / "data" / "ko-demo"

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

STAGED = """study: {{name: staged, n_trials: {n}}}
models:
  multilingual-minilm: {{}}
  multilingual-e5-small: {{}}
  bge-m3-ko: {{}}
space:
  batch_size: [32, 64, 128]
  max_len: [128, 256, 384]
  lr: {{low: 1.0e-5, high: 2.0e-4, log: true}}
  temperature: {{low: 0.01, high: 0.1, log: true}}
  warmup_ratio: {{low: 0.0, high: 0.2}}
  weight_decay: {{low: 0.0, high: 0.1}}
  conditions:
    bge-m3-ko: {{batch_size: [32, 64], max_len: [256, 384]}}
training: {{epochs: 1, amp: false, hard_negatives: 0, max_train_samples: 16}}
data: {{train: {train}, eval: {eval}, split: test}}
sampler: {{type: tpe, n_startup_trials: 2}}
pruner: {{type: none}}
stages:
{stages}
"""

THREE = """  - {name: baseline, models: [multilingual-minilm, multilingual-e5-small], n_trials: 3}
  - name: big-safe
    models: [bge-m3-ko]
    conditions: {bge-m3-ko: {batch_size: [64], max_len: [256, 384]}}
    n_trials: 2
    seed: frontier
  - {name: refine, seed: top_k, top_k: 2}"""


def _write(tmp_path: Path, stages: str = THREE, n: int = 7) -> Path:
    path = tmp_path / "staged.yaml"
    text = STAGED.format(n=n, train=DEMO / "train.jsonl", eval=DEMO, stages=stages)
    path.write_text(text, encoding="utf-8")
    return path


def test_the_shipped_spec_declares_the_playbook_and_keeps_its_conditions() -> None:
    spec = load_spec(shipped_spec_path("ko-retrieval"))
    assert [s.name for s in spec.stages] == ["baseline", "big-safe", "refine"]
    assert "bge-m3-ko" not in spec.stages[0].models  # type: ignore[operator]
    big = stage_choices(spec)["big-safe"]
    assert big["model"] == ("bge-m3-ko",)
    assert (big["batch_size"]["bge-m3-ko"], big["max_len"]["bge-m3-ko"]) == ((32, 64), (256, 384))
    assert spec.stages[2].seed == "top_k"
    cond = spec.space.conditions
    assert cond["bge-m3-ko"].batch_size == [32, 64] and cond["bge-m3-ko"].max_len == [256, 384]
    assert cond["ko-simcse"].max_len == [128]


@pytest.mark.parametrize(
    ("stages", "field", "why"),
    [
        ("  - {name: a, models: [ko-simcse], n_trials: 2}\n  - {name: b}",
         "stages.0.models (value: 'ko-simcse')", "not in models"),
        ("  - name: a\n    models: [bge-m3-ko]\n    conditions: {bge-m3-ko: {max_len: [128]}}\n"
         "    n_trials: 2\n  - {name: b}",
         "stages.0.conditions.bge-m3-ko.max_len (value: [128])", "subset"),
        ("  - {name: a, n_trials: 5}\n  - {name: b, n_trials: 3}",
         "stages.1.n_trials (value: 3)", "more than study.n_trials 7"),
        ("  - {name: a, n_trials: 7}\n  - {name: b}",
         "stages.1.n_trials (value: None)", "leaves no trial to the last stage"),
        ("  - {name: a}\n  - {name: b}", "stages.0.n_trials", "needs its budget share"),
        ("  - {name: a, seed: top_k, n_trials: 2}\n  - {name: b}", "stages.0.seed", "refine"),
        ("  - {name: a, n_trials: 2}\n  - {name: a}", "stages.1.name", "two stages"),
    ],
)  # fmt: skip
def test_a_bad_stage_is_one_line_naming_the_field(
    tmp_path: Path, stages: str, field: str, why: str
) -> None:
    path = _write(tmp_path, stages)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert f"field {field}" in message and why in message


def test_a_bad_stage_is_exit_2_from_spec_check(tmp_path: Path) -> None:
    path = _write(tmp_path, "  - {name: a, models: [nope], n_trials: 2}\n  - {name: b}")
    run = run_search("spec", "check", str(path), timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "stages.0.models" in run.stderr and "Traceback" not in run.stderr


def test_a_spec_without_stages_stays_valid(tmp_path: Path) -> None:
    plain = tmp_path / "plain.yaml"
    plain.write_text(_write(tmp_path).read_text().split("stages:")[0], encoding="utf-8")
    assert load_spec(plain).stages == []
    assert len(load_spec(_write(tmp_path)).stages) == 3


def test_the_sampler_keeps_each_stage_to_its_models_and_choices(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path))
    sampler = make_sampler(spec, seed=3)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    seen: dict[str, set[tuple[str, int, int]]] = {"baseline": set(), "big-safe": set()}
    for i in range(24):
        stage = "baseline" if i % 2 == 0 else "big-safe"
        sampler.stage = stage
        trial = study.ask()
        params = sample_params(trial, spec)
        study.tell(trial, 0.5 + 0.01 * i)
        seen[stage].add((params.model, params.batch_size, params.max_len))
    assert {m for m, _, _ in seen["baseline"]} == {"multilingual-minilm", "multilingual-e5-small"}
    assert {(m, b) for m, b, _ in seen["big-safe"]} == {("bge-m3-ko", 64)}
    assert {n for _, _, n in seen["big-safe"]} <= {256, 384}
    # The same distributions in every stage: TPE learns across them.
    dists = {tuple(sorted(t.distributions.items())) for t in study.trials}
    assert len(dists) == 1


def test_the_current_stage_is_the_first_with_budget_left(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path))

    def done(stage: str, state: TrialState = TrialState.COMPLETE) -> optuna.trial.FrozenTrial:
        value = 0.5 if state == TrialState.COMPLETE else None
        return optuna.trial.create_trial(state=state, value=value, user_attrs={"stage": stage})

    assert current_stage(spec, [], 7).name == "baseline"
    two = [done("baseline"), done("baseline")]
    assert current_stage(spec, two, 7).name == "baseline"
    assert current_stage(spec, [*two, done("baseline")], 7).name == "big-safe"
    # A preflight skip is recorded in its stage but does not spend its share
    # (search.worker.budget).
    skip = optuna.trial.create_trial(
        state=TrialState.PRUNED, user_attrs={"stage": "big-safe", "oom_kind": "frontier"}
    )
    three = [*two, done("baseline")]
    assert current_stage(spec, [*three, done("big-safe"), skip], 7).name == "big-safe"
    assert current_stage(spec, [*three, done("big-safe"), done("big-safe")], 7).name == "refine"
    # A smaller budget scales the shares down (ends rounded up); a bigger one goes to the last.
    assert stage_shares(spec, 7) == [3, 2, 2] and stage_shares(spec, 10) == [3, 2, 5]
    assert stage_shares(spec, 4) == [2, 1, 1] and stage_shares(spec, 2) == [1, 1, 0]
    assert current_stage(spec, two, 2).name == "big-safe"


@pytest.mark.train
def test_a_tiny_staged_run_finishes_three_stages_in_order_and_reports_them(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/staged.db"
    spec = _write(tmp_path)
    args = ["--spec", str(spec), "--storage", url, "--device", "cpu", "--tiny", "--seed", "1"]
    args += ["--study-name", "staged", "--objective", "stage_objective:train", "--no-preflight"]
    run = run_search("run", *args, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "per model per stage" in run.stdout

    study = optuna.load_study(study_name="staged", storage=url)
    trials = [t for t in study.get_trials() if t.state != TrialState.WAITING]
    stages = [t.user_attrs.get(attrs.STAGE) for t in trials]
    assert all(stages), stages  # every trial records its stage
    # In order: the stages never interleave.
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert order == ["baseline", "big-safe", "refine"], stages
    models = {s: {t.params["model"] for t in trials if t.user_attrs[attrs.STAGE] == s}
              for s in order}  # fmt: skip
    assert models["baseline"] <= {"multilingual-minilm", "multilingual-e5-small"}
    assert models["big-safe"] == {"bge-m3-ko"}
    big = [t for t in trials if t.user_attrs[attrs.STAGE] == "big-safe"]
    assert {t.params["batch_size"] for t in big} == {64}
    # The frontier seed starts big-safe at its largest config: it runs out of memory for real.
    assert big[0].params["max_len"] == 384 and big[0].user_attrs[attrs.OOM_KIND] == "real"
    # Refine's seeds: around the top 2 trials, new, never the OOM config again.
    refine = [t for t in trials if t.user_attrs[attrs.STAGE] == "refine"]
    assert refine and all(t.state == TrialState.COMPLETE for t in refine)
    shapes = {(t.params["model"], t.params["batch_size"], t.params["max_len"]) for t in refine}
    assert ("bge-m3-ko", 64, 384) not in shapes

    # What ``search report --json`` prints, read the lean way (only the report's attributes).
    store = create_storage(url, heartbeat_interval=None, must_exist=True)
    assert isinstance(store, optuna.storages.RDBStorage)
    data = json.loads(json.dumps(study_report(study, storage=store)))
    assert [s["stage"] for s in data["stages"]] == ["baseline", "big-safe", "refine"]
    assert sum(s["trials"] for s in data["stages"]) == len(trials)
    base, big_row, refine_row = data["stages"]
    assert base["gain"] is None and big_row["best_before"] == base["best_value"]
    best_before = max(v for v in (base["best_value"], big_row["best_value"]) if v is not None)
    assert refine_row["gain"] == pytest.approx(refine_row["best_value"] - best_before)
    assert {m["model"] for m in big_row["models"]} == {"bge-m3-ko"}


def test_the_refine_stage_enqueues_one_new_config_per_trial_around_the_top_k(
    tmp_path: Path,
) -> None:
    from search.sampling.stages import StagePlan

    spec = load_spec(_write(tmp_path))
    sampler = make_sampler(spec, seed=0)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for stage, model, batch, value in [
        ("baseline", "multilingual-minilm", 32, 0.5),
        ("baseline", "multilingual-e5-small", 64, 0.6),
        ("baseline", "multilingual-e5-small", 32, 0.55),
        ("big-safe", "bge-m3-ko", 64, 0.7),
        ("big-safe", "bge-m3-ko", 64, 0.65),
    ]:
        config = {"model": model, "model_path": model, "batch_size": batch, "max_len": 256,
                  "lr": 5e-5, "temperature": 0.03, "warmup_ratio": 0.1, "weight_decay": 0.01,
                  "epochs": 1, "amp": False, "gradient_checkpointing": False,
                  "hard_negatives": 0, "seed": 0, "device": "cpu", "train_path": "t",
                  "eval_dir": "e"}  # fmt: skip
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE,
                value=value,
                user_attrs={"stage": stage},
                system_attrs={attrs.SYSTEM_CONFIG: config},
            )
        )
    plan = StagePlan(spec, sampler, 7, config_for=None, device_total_bytes=2**34)  # type: ignore[arg-type]
    assert plan(study, study.get_trials()) == {"stage": "refine"} and sampler.stage == "refine"
    (first,) = study.get_trials(states=(TrialState.WAITING,))
    assert first.user_attrs["stage"] == "refine"
    assert first.system_attrs["fixed_params"]["model"] == "bge-m3-ko"  # around the best first
    plan(study, study.get_trials())  # one is queued: it runs first, nothing more
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1
    trial = study.ask()
    study.tell(trial, 0.66)
    plan(study, study.get_trials())  # the stage's 2nd trial: around the 2nd best
    (second,) = study.get_trials(states=(TrialState.WAITING,))
    assert second.system_attrs["fixed_params"]["model"] == "bge-m3-ko"
    assert second.system_attrs["fixed_params"] != first.system_attrs["fixed_params"]


def _record(model: str, batch: int, length: int, **over: object) -> dict[str, object]:
    return {"model": model, "model_path": model, "batch_size": batch, "max_len": length,
            "lr": 5e-5, "temperature": 0.03, "warmup_ratio": 0.1, "weight_decay": 0.01,
            "epochs": 1, "amp": False, "gradient_checkpointing": False, "hard_negatives": 0,
            "seed": 0, "device": "cpu", "train_path": "t", "eval_dir": "e",
            **over}  # fmt: skip


def _config_for(spec: object) -> object:
    from search.record.config import TrialConfig

    def config_for(model: str, batch: int, length: int) -> TrialConfig:
        return TrialConfig.from_json(_record(model, batch, length))

    return config_for


def test_the_frontier_seeds_carry_the_baseline_settings_and_a_learning_rate_ladder(
    tmp_path: Path,
) -> None:
    from search.sampling.stages import LR_LADDER
    from search.sampling.stages import frontier_seeds

    spec = load_spec(_write(tmp_path))
    big = spec.stages[1]
    kw = {"config_for": _config_for(spec), "device_total_bytes": 2**34}
    # No completed trial yet: the shape only, the sampler draws the rest (as before).
    assert frontier_seeds(spec, big, [], **kw) == [  # type: ignore[arg-type]
        {"model": "bge-m3-ko", "batch_size": 64, "max_len": 384}
    ]
    best = {"lr": 8e-5, "temperature": 0.02, "warmup_ratio": 0.12, "weight_decay": 0.03}
    trials = []
    others = ({"lr": 2e-4, "temperature": 0.09}, {"lr": 1e-5, "warmup_ratio": 0.0})
    for value, over in ((0.6, best), (0.5, others[0]), (0.4, others[1])):  # the baseline's 3
        config = _record("multilingual-e5-small", 32, 256, **over)
        trials.append(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE,
                value=value,
                params={k: config[k] for k in ("model", "batch_size", "max_len", *best)},
                distributions={
                    "model": optuna.distributions.CategoricalDistribution(
                        ["multilingual-minilm", "multilingual-e5-small", "bge-m3-ko"]
                    ),
                    "batch_size": optuna.distributions.IntDistribution(32, 128, log=True),
                    "max_len": optuna.distributions.IntDistribution(128, 384, step=128),
                    "lr": optuna.distributions.FloatDistribution(1e-5, 2e-4, log=True),
                    "temperature": optuna.distributions.FloatDistribution(0.01, 0.1, log=True),
                    "warmup_ratio": optuna.distributions.FloatDistribution(0.0, 0.2),
                    "weight_decay": optuna.distributions.FloatDistribution(0.0, 0.1),
                },
                user_attrs={"stage": "baseline"},
                system_attrs={attrs.SYSTEM_CONFIG: config},
            )
        )
    seeds = frontier_seeds(spec, big, trials, **kw)  # type: ignore[arg-type]
    # At the largest safe shape: the best earlier trial's lr on a ladder (x1/2, x1, x1/4:
    # bigger encoders fine-tune best at lower rates), the first seed with the best trial's
    # settings, the others with the centre of the top 3 trials' (a prior, not a fact).
    assert LR_LADDER[:3] == (0.5, 1.0, 0.25) and big.seeds == 3
    shape = {"model": "bge-m3-ko", "batch_size": 64, "max_len": 384}
    tops = [trials[i].system_attrs[attrs.SYSTEM_CONFIG] for i in range(3)]
    centre = {
        "temperature": pytest.approx(math.exp(sum(math.log(c["temperature"]) for c in tops) / 3)),
        "warmup_ratio": pytest.approx(sum(c["warmup_ratio"] for c in tops) / 3),
        "weight_decay": pytest.approx(sum(c["weight_decay"] for c in tops) / 3),
    }
    settings = [{k: v for k, v in best.items() if k != "lr"}, centre, centre]
    assert seeds == [
        {**shape, "lr": pytest.approx(8e-5 * f), **settings[i]}
        for i, f in enumerate(LR_LADDER[:3])
    ]
    assert seeds[1]["temperature"] != best["temperature"]

    # The stage enqueues them one at a time: after the first seed runs out of memory for
    # real, the next seed moves to the next shape that no OOM rules out.
    from search.sampling.stages import StagePlan

    sampler = make_sampler(spec, seed=0)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for t in trials:
        study.add_trial(t)
    plan = StagePlan(spec, sampler, 7, **kw)  # type: ignore[arg-type]
    assert plan(study, study.get_trials()) == {"stage": "big-safe"}
    plan(study, study.get_trials())  # one is queued: nothing more
    (first,) = study.get_trials(states=(TrialState.WAITING,))
    assert first.system_attrs["fixed_params"] == seeds[0]
    trial = study.ask()
    oom: dict[str, Any] = _record("bge-m3-ko", 64, 384, lr=4e-5)
    study._storage.set_trial_system_attr(trial._trial_id, attrs.SYSTEM_CONFIG, oom)
    facts: list[tuple[str, Any]] = [
        (attrs.OOM, True),
        (attrs.OOM_KIND, "real"),
        (attrs.DEVICE_MEMORY_MB, 2**34 / 2**20),
    ]
    for key, value in facts:
        study._storage.set_trial_user_attr(trial._trial_id, key, value)
    study.tell(trial, state=TrialState.PRUNED)
    plan(study, study.get_trials())
    (second,) = study.get_trials(states=(TrialState.WAITING,))
    assert second.system_attrs["fixed_params"] == {
        "model": "bge-m3-ko", "batch_size": 64, "max_len": 256, "lr": pytest.approx(8e-5),
        **settings[1],
    }  # fmt: skip
