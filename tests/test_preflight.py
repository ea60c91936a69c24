"""Preflight: predicted and frontier skips before any model is loaded."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from _factories import bge_cuda_config
from optuna.trial import TrialState

from search.memory.device import DeviceInfo
from search.memory.preflight import ESTIMATE_BAND
from search.memory.preflight import preflight
from search.record import attrs
from search.record.config import TrialConfig
from search.record.models import MODELS
from search.worker.isolation import TrialOutcome
from search.worker.records import claimed_record
from search.worker.records import outcome_record
from search.worker.records import skip_record

GIB = 1024**3
BGE = MODELS["bge-m3-ko"]


def _cfg(**over: Any) -> TrialConfig:
    return bge_cuda_config(**over)


def _gpu(gib: float) -> DeviceInfo:
    size = int(gib * GIB)
    return DeviceInfo(
        name="cuda:0", label=f"cuda:0 (test, {gib} GiB)", total_bytes=size, free_bytes=size
    )


def test_big_config_on_a_small_gpu_is_predicted_oom() -> None:
    decision = preflight(_cfg(batch_size=64, max_len=384), BGE, _gpu(16), [])
    assert decision.skip and decision.kind == "predicted"
    assert decision.frontier_trial is None
    assert decision.band == ESTIMATE_BAND["cuda"] and decision.free_bytes == 16 * GIB
    assert decision.lowest_bytes > 16 * GIB  # even the lowest plausible peak does not fit
    assert decision.reason.startswith("estimate ") and "(band 30%) > 16.0 GiB free" in (
        decision.reason
    )


def test_a_config_is_skipped_only_when_its_lowest_plausible_peak_does_not_fit() -> None:
    # The estimate is above the free memory, its lowest plausible value is not: it runs.
    cfg = _cfg(batch_size=32, max_len=256, gradient_checkpointing=True)
    estimate = preflight(cfg, BGE, _gpu(80), []).estimate.total_bytes
    band = ESTIMATE_BAND["cuda"]
    free = int(estimate * (1 - band / 2))
    device = DeviceInfo(name="cuda:0", label="cuda:0", total_bytes=free, free_bytes=free)
    doubt = preflight(cfg, BGE, device, [])
    assert estimate > free and not doubt.skip and doubt.kind is None
    assert doubt.lowest_bytes == int(estimate * (1 - band)) <= free
    # Without a band (the old rule at margin 1) the same config would have been skipped.
    assert preflight(cfg, BGE, device, [], band=0.0).skip
    # Below the lowest plausible value it is skipped, and the record says why.
    low = int(estimate * (1 - band)) - 2**20
    small = DeviceInfo(name="cuda:0", label="cuda:0", total_bytes=low, free_bytes=low)
    skipped = preflight(cfg, BGE, small, [])
    assert skipped.skip and skipped.kind == "predicted"
    user = skip_record(skipped, 0.01).user
    assert user[attrs.MEMORY_ESTIMATE_BAND] == band
    assert user[attrs.FREE_MEMORY_MB] == pytest.approx(low / 2**20)
    assert user[attrs.OOM_KIND] == "predicted"


def test_the_cpu_band_is_the_calibrated_one() -> None:
    cpu = DeviceInfo(name="cpu", label="cpu", total_bytes=GIB, free_bytes=GIB)
    cfg = _cfg(model="ko-simcse", batch_size=8, max_len=32, device="cpu")
    decision = preflight(cfg, MODELS["ko-simcse"], cpu, [])
    assert decision.band == ESTIMATE_BAND["cpu"] < ESTIMATE_BAND["cuda"]


def test_checkpointed_config_on_a_big_gpu_runs() -> None:
    decision = preflight(
        _cfg(batch_size=32, max_len=256, gradient_checkpointing=True), BGE, _gpu(80), []
    )
    assert not decision.skip and decision.kind is None
    assert decision.estimate.total_bytes < 0.9 * 80 * GIB


def test_estimate_can_be_turned_off() -> None:
    decision = preflight(_cfg(batch_size=64, max_len=384), BGE, _gpu(16), [], use_estimate=False)
    assert not decision.skip
    assert decision.estimate.total_bytes > 16 * GIB  # still computed, for the record


def _oom_study(cfg: TrialConfig, memory_mb: float) -> list[optuna.trial.FrozenTrial]:
    """A study with a real OOM recorded as before issue 8 (config as a user attribute)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.5))
    user_attrs = {
        attrs.CONFIG: cfg.to_json(),
        attrs.OOM: True,
        attrs.OOM_KIND: "real",
        attrs.DEVICE: "cuda:0 (test)",
        attrs.DEVICE_MEMORY_MB: memory_mb,
    }
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs=user_attrs))
    return study.get_trials(deepcopy=False)


def test_frontier_skip_names_the_trial_and_beats_the_estimate() -> None:
    trials = _oom_study(_cfg(batch_size=32, max_len=256), 80 * 1024)
    decision = preflight(
        _cfg(batch_size=32, max_len=384, gradient_checkpointing=False), BGE, _gpu(80), trials
    )
    assert decision.skip and decision.kind == "frontier"
    assert decision.frontier_trial == 1
    assert decision.reason.startswith("trial 1 ran out of memory at batch 32 x max_len 256")


def test_frontier_skip_from_the_current_record() -> None:
    """The runner's record: config as the system attribute search:config, device_kind."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    oom = _cfg(batch_size=32, max_len=256)
    record = claimed_record(oom, _gpu(80), host="h", gpu="0", worker="w")
    record.update(outcome_record(TrialOutcome("oom", phase="backward"), "ndcg@10", 2.0))
    assert attrs.CONFIG not in record.user
    study = optuna.create_study()
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.PRUNED, user_attrs=record.user, system_attrs=record.system
        )
    )
    trials = study.get_trials(deepcopy=False)
    decision = preflight(_cfg(batch_size=64, max_len=256), BGE, _gpu(80), trials)
    assert decision.skip and decision.kind == "frontier" and decision.frontier_trial == 0
    assert decision.reason.startswith("trial 0 ran out of memory at batch 32 x max_len 256")


def test_frontier_can_be_turned_off_and_does_not_cover_savers() -> None:
    trials = _oom_study(_cfg(batch_size=32, max_len=256), 80 * 1024)
    off = preflight(
        _cfg(batch_size=32, max_len=256, gradient_checkpointing=True), BGE, _gpu(80), trials
    )
    assert not off.skip
    no_frontier = preflight(
        _cfg(batch_size=32, max_len=256), BGE, _gpu(80), trials, use_frontier=False
    )
    assert no_frontier.kind != "frontier"


def test_band_is_checked() -> None:
    for band in (1.0, -0.1):
        with pytest.raises(ValueError, match="band"):
            preflight(_cfg(), BGE, _gpu(80), [], band=band)


def test_a_real_oom_becomes_a_frontier_for_dominated_configs() -> None:
    # A real allocator OOM under a memory limit (fake objective in tests/test_isolation.py),
    # recorded the way search.worker.runner records it; then preflight prunes a dominated config
    # from attributes alone (model_path does not exist: nothing is loaded).
    import os

    from search.memory.device import device_info
    from search.train.tiny import tiny_info
    from search.worker.isolation import run_isolated

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    device = device_info("cpu", memory_limit=128 * 2**20)
    cfg = _cfg(model="ko-simcse", batch_size=64, max_len=128, device="cpu")
    out = run_isolated(
        cfg, memory_limit_bytes=device.total_bytes, objective="test_isolation:allocate_until_oom"
    )
    assert out.status == "oom" and out.oom_kind == "real"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    record = claimed_record(cfg, device, host="h", gpu=None, worker="w")
    record.update(outcome_record(out, "ndcg@10", 1.0))
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.PRUNED, user_attrs=record.user, system_attrs=record.system
        )
    )
    trials = study.get_trials(deepcopy=False)
    arch = tiny_info(MODELS["ko-simcse"])
    bigger = _cfg(model="ko-simcse", batch_size=128, max_len=128, device="cpu")
    decision = preflight(bigger, arch, device, trials, use_estimate=False)
    assert decision.skip and decision.kind == "frontier" and decision.frontier_trial == 0
    smaller = _cfg(model="ko-simcse", batch_size=32, max_len=128, device="cpu")
    assert not preflight(smaller, arch, device, trials, use_estimate=False).skip
