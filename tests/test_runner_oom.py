"""How the real runner records out-of-memory: ``run_study`` on tiny replicas under a limit.

The attributes asserted here are the ones ``search.worker.runner`` wrote, not built by the test: a
config that really runs out of memory under ``--memory-limit`` (the CPU address-space cap),
the same config skipped afterwards as ``oom: frontier`` naming that trial, and a config
skipped before loading anything as ``oom: predicted`` on a tiny device.
"""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.memory.device import device_info
from search.memory.estimate import estimate_peak_memory
from search.record import attrs
from search.record.models import MODELS
from search.spec.load import load_spec
from search.spec.options import DEFAULT_CACHE
from search.spec.options import RunOptions
from search.train.tiny import tiny_info
from search.worker.budget import SkipBoundError
from search.worker.runner import run_study

pytestmark = [
    pytest.mark.train,
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning"),
]

MIB = 2**20
DEMO = Path(__file__).resolve().parents[1] / "search" / "studies" / "data" / "ko-demo"
# 64 queries + 128 passages padded to 256 tokens need about 2 GiB on CPU (tests/test_isolation):
# 640 MiB is well above what loading the tiny replica takes, well below the first step.
LIMIT = 640 * MIB


def _spec(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"""study: {{name: {name}, direction: maximize, metric: ndcg@10, n_trials: 2,
        max_skips_per_trial: 1}}
models:
  ko-simcse: {{}}
space:
  batch_size: [64]
  max_len: [256]
  lr: {{low: 1.0e-5, high: 2.0e-4, log: true}}
  temperature: {{low: 0.01, high: 0.1, log: true}}
  warmup_ratio: {{low: 0.0, high: 0.2}}
  weight_decay: {{low: 0.0, high: 0.1}}
training: {{epochs: 1, amp: false, gradient_checkpointing: false, hard_negatives: 1,
           seed: 0, max_train_samples: 64}}
data: {{train: {DEMO / "train.jsonl"}, eval: {DEMO}, split: test}}
sampler: {{type: random}}
pruner: {{type: none}}
""",
        encoding="utf-8",
    )
    return path


def _opts(tmp_path: Path, **over: object) -> RunOptions:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    base: dict[str, object] = dict(
        storage_url=f"sqlite:///{tmp_path}/oom.db",
        tiny=True,
        device="cpu",
        cache_dir=Path(os.environ.get("SEARCH_CACHE", DEFAULT_CACHE)),  # reuse built replicas
        worker="oom-test",
    )
    return RunOptions(**(base | over))  # type: ignore[arg-type]


def test_a_real_oom_is_recorded_then_dominates_the_same_config(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path, "real-oom"))
    # The estimate would skip it first (that is the next test): run it for real.
    opts = _opts(tmp_path, memory_limit=LIMIT, use_estimate=False)
    # Its one config ran out of memory, so every later trial is a frontier skip, which does
    # not spend the budget: the run ends on the skip bound (1 x the budget of 2 here).
    with pytest.raises(SkipBoundError, match="does not fit the device"):
        run_study(spec, opts)
    study = optuna.load_study(study_name="real-oom-tiny", storage=f"sqlite:///{tmp_path}/oom.db")
    first, second, third = study.get_trials()
    assert third.user_attrs[attrs.OOM_KIND] == "frontier"
    device = device_info("cpu", memory_limit=LIMIT)

    assert first.state == TrialState.PRUNED, first.user_attrs.get(attrs.ERROR)
    ua = first.user_attrs
    assert ua[attrs.OOM] is True
    assert ua[attrs.OOM_KIND] == "real"
    assert ua[attrs.OOM_PHASE] in ("forward", "backward")  # the worst-case first step
    assert ua[attrs.DEVICE] == device.label
    assert ua[attrs.DEVICE_MEMORY_MB] == pytest.approx(LIMIT / MIB)
    cfg = optuna_config(first)
    arch = tiny_info(MODELS["ko-simcse"])
    expected = estimate_peak_memory(arch, cfg, device_type="cpu").total_bytes / MIB
    assert ua[attrs.MEMORY_ESTIMATE_MB] == pytest.approx(expected)
    assert ua[attrs.MEMORY_ESTIMATE_MB] > LIMIT / MIB  # why it could not fit
    assert "memory" in str(ua[attrs.ERROR]).lower()
    assert ua[attrs.WORKER] == "oom-test"

    assert second.state == TrialState.PRUNED
    ub = second.user_attrs
    assert ub[attrs.OOM] is True and ub[attrs.OOM_KIND] == "frontier"
    assert ub[attrs.OOM_FRONTIER_TRIAL] == first.number
    assert f"trial {first.number}" in str(ub[attrs.ERROR])
    assert attrs.OOM_PHASE not in ub  # nothing ran
    assert ub[attrs.SECONDS] < ua[attrs.SECONDS]


def test_a_config_that_cannot_fit_is_skipped_before_loading(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path, "predicted"))
    tiny_device = 64 * MIB
    # Skips do not spend the budget: nothing fits, so the run stops on the skip bound
    # (study.max_skips_per_trial, 1 here, x the budget of 2) with one line (tests/test_skips.py).
    with pytest.raises(SkipBoundError, match="does not fit the device"):
        run_study(spec, _opts(tmp_path, memory_limit=tiny_device))
    study = optuna.load_study(study_name="predicted-tiny", storage=f"sqlite:///{tmp_path}/oom.db")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    for trial in trials:
        ua = trial.user_attrs
        assert ua[attrs.OOM] is True and ua[attrs.OOM_KIND] == "predicted"
        assert ua[attrs.MEMORY_ESTIMATE_MB] > 0.9 * tiny_device / MIB
        assert ua[attrs.DEVICE_MEMORY_MB] == pytest.approx(tiny_device / MIB)
        assert attrs.OOM_PHASE not in ua and attrs.PEAK_MEMORY_MB not in ua  # nothing loaded
        assert "estimate" in str(ua[attrs.ERROR]).lower()


def optuna_config(trial: optuna.trial.FrozenTrial):  # type: ignore[no-untyped-def]
    """The effective TrialConfig the runner recorded on ``trial``."""
    from search.record.config import TrialConfig
    from search.record.trial_record import config_of

    return TrialConfig.from_json(config_of(trial))
