"""Where a trial's wall time goes: measured in the child and the worker, kept, reported, noted."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from _factories import trial_config
from optuna.trial import TrialState

from search.observe.publish import study_note
from search.observe.report import study_report
from search.observe.report_view import report_text
from search.record import attrs
from search.record.config import TrialConfig
from search.record.models import MODELS
from search.record.trial_record import slowest_phase
from search.record.trial_record import trial_summary
from search.spec.load import load_spec
from search.spec.options import DEFAULT_CACHE
from search.spec.options import RunOptions
from search.train.data import load_train
from search.train.phase_clock import PhaseClock
from search.train.tiny import build_tiny_replica
from search.worker.isolation import run_isolated
from search.worker.isolation import warm_up
from search.worker.runner import run_study

HERE = "test_trial_time"  # the child imports the objectives below by this module name
DEMO = Path(__file__).resolve().parents[1] / "search" / "studies" / "data" / "ko-demo"
MODEL = "multilingual-minilm"
LOOP_PHASES = {"load", "tokenise", "train", "evaluate"}
# Rounding to ms (8 phases) and clock reads between the phases.
TOLERANCE_S = 0.02


# ------------------------------------------------------------ objectives (in the child)


def fail_after_loading(cfg: TrialConfig, *, report: Any, on_phase: Any, clock: PhaseClock) -> Any:
    """Time 50 ms of ``load``, then fail in ``train``: what was measured must still arrive."""
    clock.enter("load")
    time.sleep(0.05)
    clock.enter("train")
    raise ValueError("broken batch")


def no_timings(cfg: TrialConfig, *, report: Any, on_phase: Any) -> Any:
    """An objective of the old signature: no clock, no timings in its result."""
    return {"metrics": {"ndcg@10": 0.5}}


def own_timings(cfg: TrialConfig, *, report: Any, on_phase: Any) -> Any:
    """Timings in the result (a wrapper of ``train`` that does not take the clock)."""
    return {"metrics": {"ndcg@10": 0.5}, "timings": {"train": 1.5, "evaluate": 0.25}}


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _env() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    warm_up(f"{HERE}:no_timings")


@pytest.fixture(scope="module")
def replica() -> Path:
    texts = [t for e in load_train(DEMO / "train.jsonl") for t in (e.query, e.positive)]
    cache = Path(os.environ.get("SEARCH_CACHE", DEFAULT_CACHE))
    return build_tiny_replica(MODELS[MODEL], cache / "tiny", texts)


def _tiny(replica: Path, **over: Any) -> TrialConfig:
    base: dict[str, Any] = dict(
        model=MODEL,
        model_path=str(replica),
        lr=1e-3,
        epochs=2,
        batch_size=16,
        train_path=str(DEMO / "train.jsonl"),
        eval_dir=str(DEMO),
        max_train_samples=48,
    )
    return trial_config(**(base | over))


def _check_sum(timings: dict[str, float], seconds: float) -> None:
    assert all(v >= 0.0 for v in timings.values()), timings
    assert sum(timings.values()) <= seconds + TOLERANCE_S, (timings, seconds)


# ------------------------------------------------------------- the child's measurements


@pytest.mark.train
def test_an_isolated_trial_times_each_phase_and_the_save(replica: Path, tmp_path: Path) -> None:
    cfg = _tiny(replica, save_dir=str(tmp_path / "kept"))
    out = run_isolated(cfg)
    assert out.status == "complete", out.error
    assert set(out.timings) == {"start", *LOOP_PHASES, "save"}
    assert (tmp_path / "kept").exists()  # the save that was timed happened
    _check_sum(out.timings, out.seconds)
    assert out.timings["train"] > 0 and out.timings["evaluate"] > 0


@pytest.mark.train
def test_a_pruned_trial_keeps_what_was_measured_up_to_its_end(replica: Path) -> None:
    out = run_isolated(_tiny(replica), report=lambda epoch, metrics: True)  # prune at once
    assert out.status == "pruned"
    assert set(out.timings) == {"start", *LOOP_PHASES}  # the pruning evaluation included
    assert out.timings["evaluate"] > 0
    _check_sum(out.timings, out.seconds)


def test_a_failed_trial_keeps_its_open_phase() -> None:
    out = run_isolated(trial_config(), objective=f"{HERE}:fail_after_loading")
    assert out.status == "failed" and out.error == "ValueError: broken batch"
    assert out.timings["load"] >= 0.05
    assert set(out.timings) == {"start", "load", "train"}  # train was open when it raised
    _check_sum(out.timings, out.seconds)


def test_objectives_without_a_clock_keep_working() -> None:
    plain = run_isolated(trial_config(), objective=f"{HERE}:no_timings")
    assert plain.status == "complete" and plain.value == 0.5
    assert set(plain.timings) == {"start"}  # only what the worker measures
    given = run_isolated(trial_config(), objective=f"{HERE}:own_timings")
    assert given.timings == {"start": given.timings["start"], "train": 1.5, "evaluate": 0.25}


# ------------------------------------------------------ the trial record, end to end


@pytest.mark.train
def test_a_worker_records_the_trials_phases_and_reports_them(
    replica: Path, tmp_path: Path
) -> None:
    path = tmp_path / "timed.yaml"
    path.write_text(
        f"""study: {{name: timed, n_trials: 1}}
models: {{{MODEL}: {{}}}}
space:
  batch_size: [16]
  max_len: [32]
  lr: {{low: 1.0e-4, high: 1.0e-3, log: true}}
  temperature: {{low: 0.02, high: 0.1, log: true}}
  warmup_ratio: {{low: 0.0, high: 0.1}}
  weight_decay: {{low: 0.0, high: 0.1}}
training: {{epochs: 1, amp: false, hard_negatives: 0, seed: 0, max_train_samples: 48}}
data: {{train: {DEMO / "train.jsonl"}, eval: {DEMO}, split: test}}
sampler: {{type: random}}
""",
        encoding="utf-8",
    )
    opts = RunOptions(
        storage_url=f"sqlite:///{tmp_path}/t.db",
        tiny=True,
        device="cpu",
        cache_dir=Path(os.environ.get("SEARCH_CACHE", DEFAULT_CACHE)),
    )
    study = run_study(load_spec(path), opts).study
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs[attrs.PADDING_FREE] is True  # what ran: a BERT replica, unpadded
    timings = trial.system_attrs[attrs.SYSTEM_TIMINGS]
    assert list(timings) == ["prepare", "start", "load", "tokenise", "train", "evaluate", "record"]
    seconds = trial.user_attrs[attrs.SECONDS]
    _check_sum(timings, seconds)
    assert all(round(v, 3) == v for v in timings.values())  # ms
    # The report (its lean RDB read included) and the notes read them back.
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/t.db")
    report = study_report(study, storage=storage)
    (row,) = report["models"]
    assert row["train_share"] == pytest.approx(timings["train"] / seconds)
    assert report["train_share"] == row["train_share"]
    assert f"{row['train_share']:.0%} of worker time in training steps" in report_text(report)
    slowest = max(timings, key=lambda k: timings[k])
    note = f" — slowest: {slowest} {timings[slowest]:.1f} s of {seconds:.1f} s — {MODEL} b16"
    assert note in trial_summary(trial)


# ------------------------------------------------ report and notes from stored trials


def _trial(
    number: int, model: str, seconds: float, timings: dict[str, float] | None, **user: Any
) -> optuna.trial.FrozenTrial:
    system = {attrs.SYSTEM_TIMINGS: timings} if timings is not None else {}
    return optuna.trial.create_trial(
        state=TrialState.COMPLETE,
        value=0.1 * (number + 1),
        params={},
        distributions={},
        user_attrs={attrs.MODEL: model, attrs.SECONDS: seconds, attrs.OUTCOME: "complete", **user},
        system_attrs=system,
    )


def _stored_study() -> optuna.Study:
    study = optuna.create_study(study_name="timed", direction="maximize")
    phases = {"prepare": 0.1, "start": 0.4, "load": 1.0, "tokenise": 0.3, "train": 3.0}
    study.add_trial(_trial(0, "a", 9.8, {**phases, "evaluate": 4.2, "record": 0.2}))
    study.add_trial(_trial(1, "a", 100.0, None))  # an older trial: left out, not counted as 0
    study.add_trial(_trial(2, "b", 10.0, {**phases, "train": 8.0, "evaluate": 1.0}))
    study.add_trial(_trial(3, "c", 5.0, None))  # a model with no timed trial at all
    return study


def test_the_report_shares_training_time_per_model_and_study_wide() -> None:
    report = study_report(_stored_study())
    share = {m["model"]: m["train_share"] for m in report["models"]}
    assert share["a"] == pytest.approx(3.0 / 9.8)
    assert share["b"] == pytest.approx(8.0 / 10.0)
    assert share["c"] is None
    assert report["train_share"] == pytest.approx(11.0 / 19.8)
    text = report_text(report)
    assert "56% of worker time in training steps" in text
    row_a = next(line for line in text.splitlines() if line.lstrip().startswith("a "))
    row_c = next(line for line in text.splitlines() if line.lstrip().startswith("c "))
    assert row_a.rstrip().endswith("31%") and row_c.rstrip().endswith("-")
    note = study_note(report)
    assert "Worker time in training steps: 56%." in note
    assert "| training share |" in note
    line_b = next(line for line in note.splitlines() if line.startswith("| b |"))
    assert "| 80% |" in line_b


def test_the_dashboard_note_names_the_slowest_phase() -> None:
    trials = _stored_study().get_trials()
    assert slowest_phase(trials[0]) == "slowest: evaluate 4.2 s of 9.8 s"
    assert (
        trial_summary(trials[0])
        == "complete — ndcg@10 0.10 — slowest: evaluate 4.2 s of 9.8 s — a"
    )
    assert slowest_phase(trials[1]) is None and "slowest" not in trial_summary(trials[1])
    # Only the worker's own phases (a killed child, a fake objective): no slowest phase.
    worker_only = _trial(4, "a", 9.8, {"prepare": 0.1, "start": 0.2, "record": 9.0})
    assert slowest_phase(worker_only) is None
