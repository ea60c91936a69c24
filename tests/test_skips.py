"""Skips are free: preflight skips are recorded but do not spend the budget, up to a bound.

Unit tests on an in-memory study (the count and the bound in ``search.worker.budget``), then the
real runner on tiny replicas under ``--memory-limit``: a space that mostly does not fit the
device still trains its whole budget, and a space where nothing fits stops on the skip
bound with one line (exit 1).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import optuna
import pytest
from _cli import run_search
from optuna.trial import TrialState

from search.record import attrs
from search.record.counts import is_skip
from search.record.counts import skip_count
from search.record.counts import spent_count
from search.spec.load import load_spec
from search.spec.options import DEFAULT_CACHE
from search.spec.options import RunOptions
from search.worker.budget import SkipBoundError
from search.worker.budget import claim_trial
from search.worker.budget import ensure_budget
from search.worker.budget import finished_count
from search.worker.runner import run_study

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning"),
]

MIB = 2**20
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search" / "studies" / "data" / "ko-demo"


def _tell_skip(study: optuna.Study, trial: optuna.Trial, kind: str = "predicted") -> None:
    study._storage.set_trial_user_attr(trial._trial_id, attrs.OOM, True)
    study._storage.set_trial_user_attr(trial._trial_id, attrs.OOM_KIND, kind)
    study.tell(trial, state=TrialState.PRUNED)


def test_skips_are_recorded_but_do_not_spend_the_budget() -> None:
    study = optuna.create_study(direction="maximize")
    ensure_budget(study, 2)
    kinds = iter(["predicted", "frontier", "real", None, None])
    told = []
    while (trial := claim_trial(study, 2, max_skips=10)) is not None:
        kind = next(kinds)
        if kind in ("predicted", "frontier"):
            _tell_skip(study, trial, kind)
        elif kind == "real":  # a real OOM trained (and failed): it spends the budget
            study._storage.set_trial_user_attr(trial._trial_id, attrs.OOM_KIND, "real")
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, 0.5)
        told.append(kind)
    trials = study.get_trials()
    assert told == ["predicted", "frontier", "real", None]  # 4 recorded, 2 of them spent
    assert [is_skip(t) for t in trials] == [True, True, False, False]
    assert skip_count(trials) == 2
    assert spent_count(trials) == 2 == finished_count(study)


def test_a_running_trial_counts_until_it_ends_as_a_skip() -> None:
    study = optuna.create_study()
    trial = claim_trial(study, 1)
    assert trial is not None
    assert claim_trial(study, 1, wait=False) is None  # RUNNING: it may train, it counts
    _tell_skip(study, trial)
    assert spent_count(study.get_trials()) == 0
    assert claim_trial(study, 1) is not None


def test_the_skip_bound_stops_claims_with_one_line() -> None:
    study = optuna.create_study(study_name="nothing-fits")
    for _ in range(3):
        trial = claim_trial(study, 1, max_skips=3)
        assert trial is not None
        _tell_skip(study, trial)
    with pytest.raises(SkipBoundError) as info:
        claim_trial(study, 1, max_skips=3)
    message = str(info.value)
    assert "\n" not in message and "does not fit the device" in message
    assert "3 configs skipped" in message and "0 of 1 trials trained" in message
    assert len(study.trials) == 3  # nothing claimed past the bound


def _spec(tmp_path: Path, name: str, *, batch: str, max_len: str, n: int, bound: int) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"""study: {{name: {name}, n_trials: {n}, max_skips_per_trial: {bound}}}
models:
  ko-simcse: {{}}
space:
  batch_size: {batch}
  max_len: {max_len}
  lr: {{low: 1.0e-5, high: 2.0e-4, log: true}}
  temperature: {{low: 0.01, high: 0.1, log: true}}
  warmup_ratio: {{low: 0.0, high: 0.2}}
  weight_decay: {{low: 0.0, high: 0.1}}
training: {{epochs: 1, amp: false, hard_negatives: 1, seed: 0, max_train_samples: 16}}
data: {{train: {DEMO / "train.jsonl"}, eval: {DEMO}, split: test}}
sampler: {{type: random, seed: 3}}
pruner: {{type: none}}
""",
        encoding="utf-8",
    )
    return path


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


@pytest.mark.train
def test_a_space_that_mostly_does_not_fit_still_trains_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiny ko-simcse on CPU: of these 9 configs only the three at 32 tokens are run under
    # 200 MiB (estimates 67, 147, 239 MiB; preflight skips when estimate x (1 - band 0.2)
    # exceeds the limit: the next, 8 x 256, is 324 MiB). Batch 128 may run out for real.
    space = {"batch": "[8, 64, 128]", "max_len": "[32, 256, 512]"}
    path = _spec(tmp_path, "mostly-oom", **space, n=2, bound=50)
    spec = load_spec(path)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, _env()[key])
    opts = RunOptions(
        storage_url=f"sqlite:///{tmp_path}/s.db",
        tiny=True,
        device="cpu",
        memory_limit=200 * MIB,
        cache_dir=Path(os.environ.get("SEARCH_CACHE", DEFAULT_CACHE)),
        seed=3,
    )
    summary = run_study(spec, opts)
    trials = summary.study.get_trials()
    assert summary.stopped_by == "budget"
    assert len(trials) == 2 == finished_count(summary.study)  # the whole budget trained
    # The sampler drew only what the preflight lets run (search.memory.feasible): no skip was
    # needed.
    assert skip_count(trials) == 0
    assert all(t.params["max_len"] == 32 for t in trials)
    # A config that does not fit still comes (enqueued, or drawn by another worker's sampler):
    # it is skipped, recorded, and free. One more trial of budget: it trains one more.
    summary.study.enqueue_trial({"model": "ko-simcse", "batch_size": 128, "max_len": 512})
    summary = run_study(spec, dataclasses.replace(opts, n_trials=3, set_n_trials=True))
    trials = summary.study.get_trials()
    trained = [t for t in trials if not is_skip(t)]
    assert len(trained) == 3 == finished_count(summary.study)
    assert skip_count(trials) == 1 and is_skip(trials[2]) and trials[2].params["max_len"] == 512
    assert trials[2].state == TrialState.PRUNED
    for t in trained:  # only configs within the estimate's band were trained
        assert t.params["max_len"] == 32


@pytest.mark.train
def test_a_space_where_nothing_fits_stops_on_the_skip_bound_with_one_line(
    tmp_path: Path,
) -> None:
    spec = _spec(tmp_path, "nothing-fits", batch="[8, 64]", max_len="[32, 256]", n=2, bound=2)
    db = tmp_path / "n.db"
    args = ["--spec", str(spec), "--tiny", "--device", "cpu", "--memory-limit", "32MiB"]
    args += ["--storage", f"sqlite:///{db}"]
    done = run_search("run", *args, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "does not fit the device" in lines[0] and "4 configs skipped" in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    study = optuna.load_study(study_name="nothing-fits-tiny", storage=f"sqlite:///{db}")
    trials = study.get_trials()
    assert len(trials) == 4 and all(is_skip(t) for t in trials)
