"""The per-model report: counts, OOM kinds, OOM rate and seconds, best config, peak memory."""

from __future__ import annotations

import io
import re

import optuna
from optuna.trial import TrialState

from search.observe.report import model_rows
from search.observe.report import study_report
from search.record import attrs


def _add(
    study: optuna.Study,
    model: str,
    state: TrialState,
    value: float | None = None,
    **user_attrs: object,
) -> None:
    trial = study.ask()
    trial.set_user_attr(attrs.MODEL, model)
    # Where the runner's record keeps the effective config (search.record.trial_record).
    trial.storage.set_trial_system_attr(
        trial._trial_id,
        attrs.SYSTEM_CONFIG,
        {"model": model, "batch_size": 32, "max_len": 128, "lr": 1e-4, "temperature": 0.05},
    )
    for key, val in user_attrs.items():
        trial.set_user_attr(key, val)
    if state == TrialState.COMPLETE:
        study.tell(trial, value)
    else:
        study.tell(trial, state=state)


def _study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", study_name="r")
    _add(study, "bge-m3-ko", TrialState.COMPLETE, 0.7, seconds=10.0, peak_memory_mb=900.0)
    _add(study, "bge-m3-ko", TrialState.COMPLETE, 0.8, seconds=12.0, peak_memory_mb=1100.0)
    _add(
        study,
        "bge-m3-ko",
        TrialState.PRUNED,
        oom=True,
        oom_kind="real",
        seconds=3.0,
        peak_memory_mb=5000.0,
    )
    _add(study, "bge-m3-ko", TrialState.PRUNED, oom=True, oom_kind="frontier", seconds=0.5)
    _add(study, "bge-m3-ko", TrialState.PRUNED, oom=True, oom_kind="predicted", seconds=0.5)
    _add(study, "ko-simcse", TrialState.PRUNED, seconds=4.0)
    _add(study, "ko-simcse", TrialState.FAIL, seconds=1.0, error="ValueError: x")
    _add(study, "ko-simcse", TrialState.PRUNED, oom=True, oom_kind="host", seconds=2.0)
    return study


def test_rows_count_each_outcome_once() -> None:
    rows = {r.model: r for r in model_rows(_study().get_trials())}
    bge, simcse = rows["bge-m3-ko"], rows["ko-simcse"]
    assert (bge.trials, bge.complete, bge.pruned_early, bge.failed) == (5, 2, 0, 0)
    assert (bge.oom_real, bge.oom_frontier, bge.oom_predicted, bge.oom_host) == (1, 1, 1, 0)
    assert bge.oom_rate == 3 / 5
    assert bge.oom_seconds == 4.0
    assert bge.best_value == 0.8 and bge.best_trial == 1
    assert bge.median_peak_memory_mb == 1000.0  # OOM peaks are not a run's memory
    assert (simcse.trials, simcse.pruned_early, simcse.failed, simcse.oom_host) == (3, 1, 1, 1)
    assert simcse.best_value is None
    assert abs(simcse.oom_rate - 1 / 3) < 1e-9


def test_minimize_direction_picks_lowest() -> None:
    study = optuna.create_study(direction="minimize")
    _add(study, "m", TrialState.COMPLETE, 0.7)
    _add(study, "m", TrialState.COMPLETE, 0.2)
    (row,) = model_rows(study.get_trials(), direction="minimize")
    assert row.best_value == 0.2


def test_study_report_is_plain_json_data() -> None:
    import json

    report = study_report(_study())
    text = json.dumps(report)
    assert json.loads(text)["models"][0]["model"] == "bge-m3-ko"
    assert report["trials"] == 8
    assert report["oom_seconds"] == 6.0
    assert len(report["models"]) == 2


def test_requeued_failures_are_not_counted_as_failed() -> None:
    study = optuna.create_study(direction="maximize")
    _add(study, "m", TrialState.FAIL)  # trial 0: its worker died; re-run as trial 1
    trial = study.ask()
    study._storage.set_trial_system_attr(trial._trial_id, "retry_history", [0])
    trial.set_user_attr(attrs.MODEL, "m")
    study.tell(trial, 0.5)
    _add(study, "m", TrialState.FAIL)  # trial 2: a real failure
    (row,) = model_rows(study.get_trials())
    assert (row.trials, row.requeued, row.failed, row.complete) == (3, 1, 1, 1)


def test_lean_rdb_read_gives_the_same_report(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from storage import create_storage

    store = create_storage(f"sqlite:///{tmp_path / 'r.db'}", heartbeat_interval=None)
    study = optuna.create_study(direction="maximize", study_name="r", storage=store)
    for model, state, value, extra in [
        ("bge-m3-ko", TrialState.COMPLETE, 0.7, {"seconds": 10.0, "peak_memory_mb": 900.0}),
        ("bge-m3-ko", TrialState.COMPLETE, 0.8, {"seconds": 12.0, "peak_memory_mb": 1100.0}),
        ("bge-m3-ko", TrialState.PRUNED, None, {"oom": True, "oom_kind": "real"}),
        ("ko-simcse", TrialState.FAIL, None, {"seconds": 1.0}),
    ]:
        _add(study, model, state, value, **extra)
    full = study_report(study)
    lean = study_report(study, storage=store)
    assert lean == full
    assert lean["models"][0]["best_config"]["model"] == "bge-m3-ko"


def _finished(tmp_path):  # type: ignore[no-untyped-def]
    from _finished_study import finished_study

    return finished_study(_url(tmp_path), "f")


def _url(tmp_path) -> str:  # type: ignore[no-untyped-def]
    return f"sqlite:///{tmp_path / 'f.db'}"


def test_report_reads_at_100_columns(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from rich.console import Console

    from search.observe.report_view import report_view

    report = study_report(_finished(tmp_path))
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(report_view(report))
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    # First: the overall best trial, its score, its other metrics and its whole config.
    head = " ".join(lines[:4])
    assert lines[0].startswith("best: trial 11, bge-m3-ko, nDCG@10 0.7900 (MRR@10 0.7400")
    parts = ["Recall@10 0.9300", "batch_size=64", "max_len=256", "lr=3e-05", "epochs=2",
             "temperature=0.05", "warmup_ratio=0.1", "weight_decay=0.01"]  # fmt: skip
    for part in parts:
        assert part in head, part
    assert "model_path" not in text  # paths are not config a reader compares
    # Every model's outcomes and best config, each on one line.
    assert re.search(r"bge-m3-ko +6 +4 +0 +1/0/0/1 +0 +33% +10\.0", text)
    assert re.search(r"bge-m3-ko +0\.7900 #11 +8\.00 +b64 len256 lr=3e-05 T=0\.05", text)
    assert re.search(r"multilingual-e5-small +0\.6400 #12 .*b128 len256 .*wd=0\.01", text)
    # The OOM configs, per model, with kind and phase.
    assert re.search(r"bge-m3-ko +64 +384 +real +backward +1: #4", text)
    assert re.search(r"bge-m3-ko +64 +384 +frontier +\(skipped\) +1: #5", text)
    assert re.search(r"ko-simcse +256 +128 +host +forward +1: #8", text)


def test_json_has_the_overall_best_and_oom_configs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from _finished_study import BEST_METRICS

    from storage import create_storage

    study = _finished(tmp_path)
    report = study_report(study, storage=create_storage(_url(tmp_path)))
    assert {"study", "direction", "trials", "models", "oom_seconds"} <= set(report)  # kept
    best = report["best"]
    assert (best["trial"], best["model"], best["value"]) == (11, "bge-m3-ko", 0.79)
    assert best["config"]["batch_size"] == 64 and best["config"]["max_len"] == 256
    assert best["mrr@10"] == BEST_METRICS["mrr@10"]
    assert [best[f"recall@{k}"] for k in (1, 5, 10)] == [0.61, 0.88, 0.93]
    assert list(best)[4:] == ["mrr@10", "recall@1", "recall@5", "recall@10"]  # not MRR@1
    assert report["metric"] == "ndcg@10"
    assert report["oom_configs"][:2] == [
        {"model": "ko-simcse", "batch_size": 256, "max_len": 128, "kind": "host",
         "phase": "forward", "trials": [8]},
        {"model": "bge-m3-ko", "batch_size": 64, "max_len": 384, "kind": "real",
         "phase": "backward", "trials": [4]},
    ]  # fmt: skip
    assert report == study_report(study)  # the lean read agrees with Optuna's


def test_report_without_completed_trials(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from _finished_study import finished_study

    from search.observe.report_view import report_text

    study = finished_study(f"sqlite:///{tmp_path / 'n.db'}", "n", completed=False)
    report = study_report(study)
    assert report["best"] is None
    text = report_text(report)
    assert text.splitlines()[0] == "best: no completed trials yet"
    assert max(len(line) for line in text.splitlines()) <= 100


def test_many_oom_trials_fold_within_100_columns() -> None:
    from search.observe.report_view import report_text

    report = study_report(_study())
    report["oom_configs"] = [
        {"model": "multilingual-e5-small", "batch_size": 256, "max_len": 512,
         "kind": "predicted", "phase": None, "trials": list(range(1000, 1040))},
    ]  # fmt: skip
    text = report_text(report)
    assert "40: #1000 #1001 #1002 #1003 #1004 #1005 +34 more" in " ".join(text.split())
    assert max(len(line) for line in text.splitlines()) <= 100


def _staged(storage: object = None) -> optuna.Study:
    """Three stages: baseline (two models), big-safe (an OOM, then 0.8), refine (0.85)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", study_name="staged", storage=storage)  # type: ignore[arg-type]
    rows = [
        ("baseline", "ko-simcse", TrialState.COMPLETE, 0.5),
        ("baseline", "multilingual-e5-small", TrialState.COMPLETE, 0.6),
        ("baseline", "ko-simcse", TrialState.COMPLETE, 0.55),
        ("big-safe", "bge-m3-ko", TrialState.PRUNED, None),
        ("big-safe", "bge-m3-ko", TrialState.COMPLETE, 0.8),
        ("refine", "bge-m3-ko", TrialState.COMPLETE, 0.85),
        ("refine", "bge-m3-ko", TrialState.COMPLETE, 0.7),
    ]
    for stage, model, state, value in rows:
        extra = {"oom": True, "oom_kind": "real"} if state == TrialState.PRUNED else {}
        _add(study, model, state, value, stage=stage, **extra)
    return study


def test_per_stage_section_best_per_model_and_what_refine_gained(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from search.observe.report_view import report_text
    from storage import create_storage

    url = f"sqlite:///{tmp_path}/staged.db"
    _staged(url)
    store = create_storage(url, heartbeat_interval=None, must_exist=True)
    study = optuna.load_study(study_name="staged", storage=store)
    report = study_report(study, storage=store)  # the lean read keeps the stage
    assert report == study_report(study)
    base, big, refine = report["stages"]
    assert [s["stage"] for s in report["stages"]] == ["baseline", "big-safe", "refine"]
    assert [s["trials"] for s in report["stages"]] == [3, 2, 2]
    assert {m["model"]: m["best_value"] for m in base["models"]} == {
        "ko-simcse": 0.55,
        "multilingual-e5-small": 0.6,
    }
    assert base["gain"] is None and base["best_value"] == 0.6
    assert big["best_before"] == 0.6 and abs(big["gain"] - 0.2) < 1e-9
    assert refine["best_trial"] == 5 and abs(refine["gain"] - 0.05) < 1e-9
    assert refine["models"][0]["best_config"]["batch_size"] == 32
    text = report_text(report)
    assert "per model per stage" in text and "+0.0500" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    # A single-stage study has no stage section.
    assert study_report(_study())["stages"] == []
    assert "per stage" not in report_text(study_report(_study()))


def test_commands_stay_on_one_line_in_a_narrow_console() -> None:
    """The kept models' ``search best`` command is copied whole, even 60 columns wide."""
    from search.observe.report_view import report_text

    report = study_report(_study())
    report["study"] = "a-study-name-long-enough-to-pass-sixty-columns-by-itself"
    report["kept_models"] = [{"trial": 3}, {"trial": 7}]
    text = report_text(report, width=60)
    line = next(line for line in text.splitlines() if line.startswith("kept models"))
    assert line.endswith(f"search best --study {report['study']} --export DIR)"), text
