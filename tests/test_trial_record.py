"""The trial record: one writer, flat short user attributes, readers of old studies, summaries.

The end-to-end test runs the real ``search run`` with a fake objective (``tests/fixtures``):
the runner, the storage and the record are real, only training is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from _cli import run_search
from _factories import bge_cuda_config
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search.memory.device import DeviceInfo
from search.memory.frontier import find_frontier_oom
from search.memory.preflight import PreflightDecision
from search.observe.report import study_report
from search.record import attrs
from search.record.config import TrialConfig
from search.record.trial_record import config_of
from search.record.trial_record import device_kind_of
from search.record.trial_record import error_of
from search.record.trial_record import metric_value
from search.record.trial_record import metrics_of
from search.record.trial_record import name_metric
from search.record.trial_record import outcome_of
from search.record.trial_record import trial_summary
from search.record.trial_record import write_record
from search.worker.isolation import TrialOutcome
from search.worker.records import claimed_record
from search.worker.records import outcome_record
from search.worker.records import skip_record

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
GIB_MB = 1024.0
H100 = DeviceInfo("cuda:0", "cuda:0 (NVIDIA H100 80GB HBM3, 79.1 GiB)", 79 * 2**30, 70 * 2**30)
CPU = DeviceInfo("cpu", "cpu (62.8 GiB)", 62 * 2**30, 40 * 2**30)
# A cell of the dashboard's trial table: one short value, never a JSON object or list.
SCALAR = (str, int, float, bool, type(None))


def _cfg(**over: object) -> TrialConfig:
    base: dict[str, object] = dict(
        model_path=None,
        batch_size=64,
        max_len=384,
        lr=1e-5,
        weight_decay=0.0,
        train_path="t",
        eval_dir="e",
    )
    return bge_cuda_config(**(base | over))


def _trial(state: TrialState, value: float | None = None, **kw: object) -> FrozenTrial:
    return optuna.trial.create_trial(state=state, value=value, **kw)  # type: ignore[arg-type]


def _claimed(device: DeviceInfo = H100, **over: object) -> dict[str, object]:
    return claimed_record(_cfg(**over), device, host="h", gpu="0", worker="w").user


# Summaries, one per kind of outcome.


def test_summary_of_a_real_oom_names_phase_memory_and_config() -> None:
    ua = _claimed(batch_size=64, max_len=384) | {
        attrs.DEVICE_MEMORY_MB: 24 * GIB_MB,
        attrs.PEAK_MEMORY_MB: 23.1 * GIB_MB,
    }
    rec = outcome_record(
        TrialOutcome("oom", phase="backward", error="OutOfMemoryError: CUDA out of memory"),
        "ndcg@10",
        3.0,
    )
    t = _trial(TrialState.PRUNED, user_attrs=ua | rec.user)
    assert trial_summary(t) == "OOM (real) in backward at 23.1 of 24.0 GiB — bge-m3-ko b64 len384"
    host = outcome_record(TrialOutcome("killed", oom_kind="host", phase="forward"), "x", 1.0)
    t = _trial(TrialState.PRUNED, user_attrs=_claimed() | host.user)
    assert trial_summary(t) == "OOM (host) in forward on 79.0 GiB — bge-m3-ko b64 len384"
    assert outcome_of(t) == "oom"


def _decision(kind: str, frontier: int | None = None) -> PreflightDecision:
    from search.memory.estimate import estimate_peak_memory
    from search.record.models import MODELS

    estimate = estimate_peak_memory(MODELS["bge-m3-ko"], _cfg(), device_type="cuda")
    return PreflightDecision(True, kind, "estimate does not fit", estimate, frontier)


def test_summary_of_preflight_skips() -> None:
    ua = _claimed() | {attrs.DEVICE_MEMORY_MB: 24 * GIB_MB, attrs.MEMORY_ESTIMATE_MB: 30925.0}
    predicted = ua | skip_record(_decision("predicted"), 0.01).user
    t = _trial(TrialState.PRUNED, user_attrs=predicted)
    assert trial_summary(t) == "OOM predicted: estimate 30.2 of 24.0 GiB — bge-m3-ko b64 len384"
    frontier = ua | skip_record(_decision("frontier", 7), 0.01).user
    t = _trial(TrialState.PRUNED, user_attrs=frontier)
    assert trial_summary(t) == "skipped: dominated by OOM trial 7 — bge-m3-ko b64 len384"
    assert frontier[attrs.OUTCOME] == "oom" and frontier[attrs.OOM_FRONTIER_TRIAL] == 7


def test_summary_of_pruned_complete_failed_handed_back_stale() -> None:
    ua = _claimed(model="ko-simcse", batch_size=32, max_len=128)
    pruned = ua | outcome_record(TrialOutcome("pruned"), "ndcg@10", 5.0).user
    t = _trial(
        TrialState.PRUNED,
        user_attrs=pruned,
        intermediate_values={1: 0.41},
    )
    assert trial_summary(t, pruner="median") == (
        "pruned by the median rule at 1 examples seen — ndcg@10 0.41 — ko-simcse b32 len128"
    )
    out = TrialOutcome("complete", metrics={"ndcg@10": 0.634}, peak_memory_mb=3.2 * GIB_MB)
    complete = _claimed(model="multilingual-e5-small", batch_size=128, max_len=256)
    rec = outcome_record(out, "ndcg@10", 9.0)
    t = _trial(TrialState.COMPLETE, 0.634, user_attrs=complete | rec.user)
    assert trial_summary(t) == (
        "complete — ndcg@10 0.63 — multilingual-e5-small b128 len256, peak 3.2 GiB"
    )
    failed = ua | outcome_record(TrialOutcome("failed", error="ValueError: boom"), "x", 1).user
    t = _trial(TrialState.FAIL, user_attrs=failed)
    assert trial_summary(t) == "failed: ValueError: boom — ko-simcse b32 len128"
    handed = ua | {attrs.HANDED_BACK: True, attrs.OUTCOME: "handed_back"}
    t = _trial(TrialState.FAIL, user_attrs=handed)
    assert trial_summary(t, requeued_as=9) == (
        "handed back (worker stopped), re-queued as trial 9 — ko-simcse b32 len128"
    )
    stale = _trial(TrialState.FAIL, user_attrs=ua)  # outcome still "running": worker lost
    assert outcome_of(stale) == "failed"
    assert trial_summary(stale, requeued_as=4).startswith("failed: worker lost (heartbeat stale)")
    running = optuna.trial.FrozenTrial(
        0, TrialState.RUNNING, None, None, None, {}, {}, ua, {}, {}, 0
    )
    assert trial_summary(running).startswith("running — ko-simcse b32 len128 on cuda:0")


def test_summary_reads_a_record_from_before_issue_8() -> None:
    """Old trials: config and metrics as user attributes, no outcome, no device_kind."""
    old = {
        attrs.CONFIG: _cfg(model="ko-simcse", batch_size=32, max_len=128).to_json(),
        attrs.METRICS: {"ndcg@10": 0.52, "mrr@10": 0.4},
        attrs.DEVICE: "cuda:0 (NVIDIA A10, 22.0 GiB)",
        attrs.PEAK_MEMORY_MB: 2048.0,
    }
    t = _trial(TrialState.COMPLETE, 0.52, user_attrs=old)
    assert trial_summary(t) == "complete — ndcg@10 0.52 — ko-simcse b32 len128, peak 2.0 GiB"
    assert config_of(t) == old[attrs.CONFIG]
    assert metrics_of(t)["mrr@10"] == 0.4 and metric_value(t) == 0.52
    assert device_kind_of(t.user_attrs) == "cuda"


# The record as written.


def test_claimed_record_is_flat_and_names_the_device() -> None:
    rec = claimed_record(_cfg(), H100, host="h", gpu="0", worker="w", memory_estimate_mb=1.5)
    assert all(isinstance(v, SCALAR) for v in rec.user.values()), rec.user
    assert rec.user[attrs.OUTCOME] == "running"
    assert rec.user[attrs.DEVICE_KIND] == "cuda"
    assert rec.user[attrs.GPU_NAME] == "NVIDIA H100 80GB HBM3"
    assert rec.user[attrs.MEMORY_ESTIMATE_MB] == 1.5
    assert rec.system[attrs.SYSTEM_CONFIG] == _cfg().to_json()
    cpu = claimed_record(_cfg(), CPU, host="h", gpu=None, worker="w")
    assert cpu.user[attrs.DEVICE_KIND] == "cpu" and attrs.GPU_NAME not in cpu.user
    assert attrs.GPU not in cpu.user  # None is left out, not shown as a "null" column


def test_outcome_record_vocabulary() -> None:
    def outcome(o: TrialOutcome) -> str:
        return str(outcome_record(o, "ndcg@10", 1.0).user[attrs.OUTCOME])

    assert outcome(TrialOutcome("complete", metrics={"ndcg@10": 0.5})) == "complete"
    assert outcome(TrialOutcome("pruned")) == "pruned"
    assert outcome(TrialOutcome("oom")) == "oom"
    assert outcome(TrialOutcome("killed", oom_kind="host")) == "oom"
    assert outcome(TrialOutcome("killed", error="killed by signal 9")) == "failed"
    assert outcome(TrialOutcome("failed", error="x")) == "failed"
    # Finished without the study's metric: a failure that says so (not a KeyError).
    missing = outcome_record(TrialOutcome("complete", metrics={"mrr@10": 0.5}), "ndcg@10", 1.0)
    assert missing.user[attrs.OUTCOME] == "failed" and "ndcg@10" in missing.user[attrs.ERROR]
    assert set(attrs.OUTCOMES) >= {"complete", "pruned", "oom", "failed", "handed_back"}
    error = "ModelLoadError: " + "x" * 600 + " Fix: use --tiny"
    long = outcome_record(TrialOutcome("failed", error=error), "ndcg@10", 1.0)
    assert len(long.user[attrs.ERROR]) <= 300  # a table cell
    t = _trial(TrialState.FAIL, user_attrs=long.user, system_attrs=long.system)
    assert error_of(t) == error  # the whole line for the runner's stop message and scripts
    short = outcome_record(TrialOutcome("failed", error="E: x"), "ndcg@10", 1.0)
    assert attrs.SYSTEM_ERROR not in short.system


def test_frontier_uses_device_kind_and_reads_old_records() -> None:
    study = optuna.create_study(storage="sqlite:///:memory:")
    oom = outcome_record(TrialOutcome("oom", phase="forward"), "ndcg@10", 1.0)
    record = claimed_record(_cfg(), H100, host="h", gpu="0", worker="w").update(oom)
    trial = study.ask()
    write_record(study._storage, trial._trial_id, record)
    study.tell(trial, state=TrialState.PRUNED)
    trials = study.get_trials()
    assert attrs.CONFIG not in trials[0].user_attrs  # the config is a system attribute now
    assert find_frontier_oom(trials, _cfg(batch_size=128), H100.total_bytes, device_kind="cuda")
    assert not find_frontier_oom(trials, _cfg(batch_size=128), H100.total_bytes, device_kind="cpu")
    # device_kind wins over the label: a label that parses to another kind is not read.
    relabelled = study.ask()
    record.user[attrs.DEVICE] = "weird-label"
    write_record(study._storage, relabelled._trial_id, record)
    study.tell(relabelled, state=TrialState.PRUNED)
    found = find_frontier_oom(
        study.get_trials()[1:], _cfg(batch_size=128), H100.total_bytes, device_kind="cuda"
    )
    assert found is not None and found.number == 1


def test_report_reads_the_best_config_from_new_and_old_records(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/r.db"
    study = optuna.create_study(storage=url, study_name="r", direction="maximize")
    for model, value, old in (("a", 0.5, False), ("b", 0.6, True)):
        trial = study.ask()
        cfg = _cfg(model=model, batch_size=32 if old else 64)
        if old:
            trial.set_user_attr(attrs.MODEL, model)
            trial.set_user_attr(attrs.CONFIG, cfg.to_json())
        else:
            rec = claimed_record(cfg, CPU, host="h", gpu=None, worker="w")
            write_record(study._storage, trial._trial_id, rec)
        study.tell(trial, value)
    storage = optuna.storages.RDBStorage(url)
    fast = {m["model"]: m["best_config"] for m in study_report(study, storage=storage)["models"]}
    slow = {m["model"]: m["best_config"] for m in study_report(study)["models"]}
    assert fast == slow
    assert fast["a"]["batch_size"] == 64 and fast["b"]["batch_size"] == 32


def test_name_metric_names_an_unnamed_study_once() -> None:
    study = optuna.create_study()
    name_metric(study, "ndcg@10")
    assert study.metric_names == ["ndcg@10"]
    name_metric(study, "mrr@10")  # an existing name is kept
    assert study.metric_names == ["ndcg@10"]


# End to end: the real runner writes the record.


def test_a_run_writes_flat_user_attrs_and_the_config_as_system_attrs(tmp_path: Path) -> None:
    env = {"SEARCH_CACHE": str(tmp_path / "cache")}
    url = f"sqlite:///{tmp_path}/record.db"
    # After trial 3's real OOM every config is a frontier skip, which spends no budget: the
    # run ends on the skip bound, kept short here (1 x the budget of 5).
    raw = yaml.safe_load((FIXTURES / "tiny_workers.yaml").read_text(encoding="utf-8"))
    raw["study"]["max_skips_per_trial"] = 1
    for key in ("train", "eval"):
        raw["data"][key] = str((FIXTURES / raw["data"][key]).resolve())
    spec = tmp_path / "record.yaml"
    spec.write_text(yaml.safe_dump(raw), encoding="utf-8")
    args = ["--spec", str(spec), "--storage", url, "--device", "cpu"]
    args += ["--n-trials", "5", "--study-name", "rec", "--objective", "record_objective:train"]
    run = run_search("run", *args, cwd=tmp_path, env=env)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert "does not fit the device" in run.stdout + run.stderr
    study = optuna.load_study(study_name="rec", storage=url)
    assert study.metric_names == ["ndcg@10"]  # the dashboard's axes say it
    trials = study.get_trials()
    assert [outcome_of(t) for t in trials] == ["pruned", "complete", "failed", *["oom"] * 6]
    assert [t.user_attrs[attrs.OUTCOME] for t in trials] == [outcome_of(t) for t in trials]
    for t in trials:
        bad = {k: v for k, v in t.user_attrs.items() if not isinstance(v, SCALAR)}
        assert not bad, f"trial {t.number}: JSON in user attrs {bad}"
        assert len(t.user_attrs) <= 20, sorted(t.user_attrs)
        assert t.user_attrs[attrs.DEVICE_KIND] == "cpu"
        assert t.user_attrs[attrs.MODEL] == "multilingual-minilm"
        assert config_of(t) == t.system_attrs[attrs.SYSTEM_CONFIG]
        assert t.system_attrs[attrs.SYSTEM_CONFIG]["batch_size"] == 32
    pruned, complete, failed, oom, frontier = trials[:5]
    assert complete.user_attrs["ndcg@10"] == complete.value == 0.63
    assert complete.system_attrs[attrs.SYSTEM_METRICS]["mrr@10"] == 0.35
    assert [h["ndcg@10"] for h in complete.system_attrs[attrs.SYSTEM_HISTORY]] == [0.5, 0.63]
    assert complete.user_attrs[attrs.PEAK_MEMORY_MB] == 3276.8
    assert trial_summary(complete).startswith("complete — ndcg@10 0.63 — multilingual-minilm b32")
    assert trial_summary(pruned).startswith("pruned at 1 examples seen — ndcg@10 0.41")
    assert trial_summary(failed).startswith("failed: ValueError: boom")
    assert trial_summary(oom).startswith("OOM (real) in backward at ")
    assert trial_summary(frontier) == (
        f"skipped: dominated by OOM trial {oom.number} — multilingual-minilm b32 len128"
    )
    report = run_search("report", "--study", "rec", "--storage", url, "--json", cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-2000:]
    (row,) = json.loads(report.stdout)["models"]
    assert row["best_config"] == complete.system_attrs[attrs.SYSTEM_CONFIG]


@pytest.mark.parametrize("kind", ["frontier", "predicted"])
def test_skip_record_is_flat(kind: str) -> None:
    rec = skip_record(_decision(kind, 3 if kind == "frontier" else None), 0.02)
    assert all(isinstance(v, SCALAR) for v in rec.user.values())
    assert rec.user[attrs.OOM_KIND] == kind and rec.user[attrs.OOM] is True
    assert not rec.system
