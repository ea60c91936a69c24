"""The OOM frontier: a real OOM prunes every config that needs at least as much memory."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from _factories import bge_cuda_config
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search.memory.frontier import dominates
from search.memory.frontier import evidence
from search.memory.frontier import find_estimate_oom
from search.memory.frontier import find_frontier_oom
from search.record import attrs
from search.record.config import TrialConfig

GIB = 1024**3


def _cfg(**over: Any) -> TrialConfig:
    return bge_cuda_config(**over)


def _trials(
    *records: tuple[TrialConfig, dict[str, Any], TrialState], legacy: bool = False
) -> list[FrozenTrial]:
    """Trials recorded as the runner does (``legacy``: as before issue 8, config a user attr)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    for cfg, extra, state in records:
        user_attrs: dict[str, Any] = {
            attrs.DEVICE: "cuda:0 (NVIDIA H100 80GB HBM3, 79.1 GiB)",
            attrs.DEVICE_MEMORY_MB: 80 * 1024.0,
            **extra,
        }
        system_attrs: dict[str, Any] = {}
        if legacy:
            user_attrs[attrs.CONFIG] = cfg.to_json()
        else:
            user_attrs[attrs.DEVICE_KIND] = "cuda"
            system_attrs[attrs.SYSTEM_CONFIG] = cfg.to_json()
        value = 0.5 if state == TrialState.COMPLETE else None
        trial = optuna.trial.create_trial(
            state=state, value=value, user_attrs=user_attrs, system_attrs=system_attrs
        )
        study.add_trial(trial)
    return study.get_trials(deepcopy=False)


REAL_OOM = {attrs.OOM: True, attrs.OOM_KIND: "real"}


def test_dominated_config_is_found_naming_the_trial() -> None:
    trials = _trials(
        (_cfg(batch_size=16), {}, TrialState.COMPLETE),
        (_cfg(batch_size=64, max_len=256), REAL_OOM, TrialState.PRUNED),
    )
    hit = find_frontier_oom(trials, _cfg(batch_size=64, max_len=384), 80 * GIB)
    assert hit is not None and hit.number == 1


def test_old_records_are_read_the_same_way() -> None:
    """Studies from before issue 8: config as a user attribute, the kind from the label."""
    records = (
        (_cfg(batch_size=16), {}, TrialState.COMPLETE),
        (_cfg(batch_size=64, max_len=256), REAL_OOM, TrialState.PRUNED),
    )
    trials = _trials(*records, legacy=True)
    assert attrs.DEVICE_KIND not in trials[1].user_attrs
    hit = find_frontier_oom(trials, _cfg(batch_size=64, max_len=384), 80 * GIB)
    assert hit is not None and hit.number == 1
    assert find_frontier_oom(trials, _cfg(batch_size=64), 80 * GIB, device_kind="cpu") is None
    assert find_frontier_oom(trials, _cfg(batch_size=64), 80 * GIB, device_kind="cuda") == hit


def test_outcome_oom_alone_counts_and_device_kind_beats_the_label() -> None:
    oom = {attrs.OUTCOME: attrs.OUTCOME_OOM, attrs.OOM_KIND: "real"}
    trials = _trials((_cfg(batch_size=64), oom, TrialState.PRUNED))
    assert find_frontier_oom(trials, _cfg(batch_size=64), 80 * GIB, device_kind="cuda")
    relabelled = {**REAL_OOM, attrs.DEVICE: "cpu (an odd label)"}
    trials = _trials((_cfg(batch_size=64), relabelled, TrialState.PRUNED))
    assert find_frontier_oom(trials, _cfg(batch_size=64), 80 * GIB, device_kind="cuda")


def test_smaller_config_is_not_dominated() -> None:
    trials = _trials((_cfg(batch_size=64, max_len=256), REAL_OOM, TrialState.PRUNED))
    assert find_frontier_oom(trials, _cfg(batch_size=32, max_len=384), 80 * GIB) is None
    assert find_frontier_oom(trials, _cfg(batch_size=64, max_len=128), 80 * GIB) is None


def test_more_savers_or_another_model_is_not_dominated() -> None:
    trials = _trials((_cfg(batch_size=64), REAL_OOM, TrialState.PRUNED))
    assert (
        find_frontier_oom(trials, _cfg(batch_size=64, gradient_checkpointing=True), 80 * GIB)
        is None
    )
    assert find_frontier_oom(trials, _cfg(batch_size=64, model_path="/other"), 80 * GIB) is None
    assert find_frontier_oom(trials, _cfg(batch_size=64, model="ko-simcse"), 80 * GIB) is None
    # Fewer savers needs more memory: still dominated.
    assert find_frontier_oom(trials, _cfg(batch_size=64, amp=False), 80 * GIB) is not None
    assert find_frontier_oom(trials, _cfg(batch_size=64, hard_negatives=1), 80 * GIB) is not None


def test_device_size_rule() -> None:
    trials = _trials((_cfg(batch_size=64), REAL_OOM, TrialState.PRUNED))  # OOM on 80 GiB
    # A device with the same or less memory learns from it...
    assert find_frontier_oom(trials, _cfg(batch_size=64), 80 * GIB) is not None
    assert find_frontier_oom(trials, _cfg(batch_size=64), 40 * GIB) is not None
    # ...a bigger one does not.
    assert find_frontier_oom(trials, _cfg(batch_size=64), 141 * GIB) is None


def test_only_real_and_host_ooms_make_a_frontier() -> None:
    trials = _trials(
        (_cfg(batch_size=64), {attrs.OOM: True, attrs.OOM_KIND: "predicted"}, TrialState.PRUNED),
        (_cfg(batch_size=64), {attrs.OOM: True, attrs.OOM_KIND: "frontier"}, TrialState.PRUNED),
        (_cfg(batch_size=64), {}, TrialState.PRUNED),  # an early stop, not an OOM
    )
    assert find_frontier_oom(trials, _cfg(batch_size=64), 80 * GIB) is None
    host = _trials(
        (_cfg(batch_size=64), {attrs.OOM: True, attrs.OOM_KIND: "host"}, TrialState.FAIL)
    )
    assert find_frontier_oom(host, _cfg(batch_size=64), 80 * GIB) is not None


def test_earliest_justifying_trial_wins_and_device_kind_filters() -> None:
    trials = _trials(
        (_cfg(batch_size=64, max_len=256), REAL_OOM, TrialState.PRUNED),
        (_cfg(batch_size=32, max_len=256), REAL_OOM, TrialState.PRUNED),
    )
    hit = find_frontier_oom(trials, _cfg(batch_size=64, max_len=384), 80 * GIB)
    assert hit is not None and hit.number == 0
    assert find_frontier_oom(trials, _cfg(batch_size=64), 80 * GIB, device_kind="cpu") is None
    assert find_frontier_oom(trials, _cfg(batch_size=64), 80 * GIB, device_kind="cuda") is not None


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"model": "bge-m3-ko"},
        {
            "model": "bge-m3-ko",
            "model_path": "/nonexistent/bge-m3-ko",
            "batch_size": "x",
            "max_len": 1,
        },
    ],
)
def test_malformed_config_proves_nothing(bad: dict[str, Any]) -> None:
    assert not dominates(_cfg(), bad)


def test_a_plain_oom_does_not_prune_the_cached_config_of_a_larger_batch() -> None:
    plain = _cfg(batch_size=64, max_len=384)
    trials = _trials((plain, REAL_OOM, TrialState.PRUNED))
    # The gradient cache's mini-batch (32 rows) is what is in memory, not the batch.
    for batch in (64, 128, 256):
        cached = _cfg(batch_size=batch, max_len=384, gradient_cache=32)
        assert find_frontier_oom(trials, cached, 80 * GIB) is None
    # A cached mini-batch as large as the plain batch holds as much: it is pruned.
    hit = find_frontier_oom(trials, _cfg(batch_size=128, max_len=384, gradient_cache=64), 80 * GIB)
    assert hit is not None and hit.number == 0
    # The plain config itself still is.
    assert find_frontier_oom(trials, _cfg(batch_size=64, max_len=512), 80 * GIB) is not None


def test_a_cached_oom_prunes_larger_mini_batches_and_plain_batches_but_not_smaller_ones() -> None:
    oom = _cfg(batch_size=128, max_len=384, gradient_cache=32)
    trials = _trials((oom, REAL_OOM, TrialState.PRUNED))
    assert find_frontier_oom(
        trials, _cfg(batch_size=256, max_len=384, gradient_cache=32), 80 * GIB
    )
    assert find_frontier_oom(
        trials, _cfg(batch_size=128, max_len=384), 80 * GIB
    )  # plain: 128 rows
    assert (
        find_frontier_oom(trials, _cfg(batch_size=128, max_len=384, gradient_cache=16), 80 * GIB)
        is None
    )
    assert (
        find_frontier_oom(trials, _cfg(batch_size=64, max_len=384, gradient_cache=32), 80 * GIB)
        is None
    )
    # An auto cache never resolved (no preflight ran) proves nothing either way.
    assert not dominates(_cfg(batch_size=256, max_len=384, gradient_cache=-1), oom.to_json())


def _est(mb: float, **extra: Any) -> dict[str, Any]:
    return {attrs.MEMORY_ESTIMATE_MB: mb, **extra}


def test_a_real_oom_rules_out_configs_estimated_at_least_as_high_of_any_model() -> None:
    trials = _trials((_cfg(model="m-a"), _est(60_000, **REAL_OOM), TrialState.PRUNED))
    hit = find_estimate_oom(trials, 60_000, 80 * GIB, device_kind="cuda")
    assert hit is not None and hit.number == 0
    assert find_estimate_oom(trials, 70_000, 80 * GIB, device_kind="cuda") == hit
    assert find_estimate_oom(trials, 59_999.5, 80 * GIB, device_kind="cuda") == hit  # the same
    assert find_estimate_oom(trials, 59_990, 80 * GIB, device_kind="cuda") is None
    # Another kind of device, or a device with more memory than the one that ran out: nothing.
    assert find_estimate_oom(trials, 70_000, 80 * GIB, device_kind="cpu") is None
    assert find_estimate_oom(trials, 70_000, 100 * GIB, device_kind="cuda") is None
    assert find_estimate_oom(trials, 70_000, 40 * GIB, device_kind="cuda") == hit


def test_a_trained_trial_estimated_as_high_overrules_the_estimate_rule() -> None:
    pruned_by_pruner = {attrs.OUTCOME: attrs.OUTCOME_PRUNED}
    trials = _trials(
        (_cfg(model="m-a"), _est(60_000, **REAL_OOM), TrialState.PRUNED),
        (_cfg(model="m-b"), _est(65_000), TrialState.COMPLETE),
        (_cfg(model="m-c"), _est(68_000, **pruned_by_pruner), TrialState.PRUNED),
    )
    assert find_estimate_oom(trials, 64_000, 80 * GIB, device_kind="cuda") is None  # m-b trained
    assert find_estimate_oom(trials, 68_000, 80 * GIB, device_kind="cuda") is None  # m-c did
    hit = find_estimate_oom(trials, 68_002, 80 * GIB, device_kind="cuda")
    assert hit is not None and hit.number == 0
    # Predicted skips and failures prove nothing either way.
    skips = _trials(
        (
            _cfg(),
            _est(50_000, **{attrs.OOM: True, attrs.OOM_KIND: "predicted"}),
            TrialState.PRUNED,
        ),
        (_cfg(), _est(90_000), TrialState.FAIL),
    )
    assert find_estimate_oom(skips, 60_000, 80 * GIB, device_kind="cuda") is None


def test_the_evidence_gives_the_same_answers_as_every_trial() -> None:
    import random

    rng = random.Random(0)
    records = []
    for i in range(200):
        kind = rng.choice(["real", "predicted", None, None, None])
        extra = _est(rng.uniform(10_000, 90_000))
        if kind is not None:
            extra |= {attrs.OOM: True, attrs.OOM_KIND: kind}
        if rng.random() < 0.3:
            extra[attrs.DEVICE_MEMORY_MB] = 40 * 1024.0
        state = TrialState.PRUNED if kind or i % 3 == 0 else TrialState.COMPLETE
        shape = dict(batch_size=rng.choice([32, 64]), max_len=rng.choice([256, 384]))
        records.append((_cfg(**shape), extra, state))
    trials = _trials(*records)
    few = evidence(trials)
    assert len(few) < len(trials) / 2
    for mb in range(5_000, 95_000, 500):
        for memory in (40 * GIB, 80 * GIB):
            kind = "cuda"
            full = find_estimate_oom(trials, mb, memory, device_kind=kind)
            assert find_estimate_oom(few, mb, memory, device_kind=kind) == full
    for shape in ({"batch_size": 32}, {"batch_size": 64, "max_len": 384}):
        cfg = _cfg(**shape)
        assert find_frontier_oom(few, cfg, 40 * GIB) == find_frontier_oom(trials, cfg, 40 * GIB)
