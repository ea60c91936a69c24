"""The peer median pruner (``pruner.type: peer_median``): like with like, within the noise.

A slow-starting big model is held to its own model's trials, not the small ones'; a trial
behind by less than ``noise_z`` standard errors of its report is kept; the warm-up is a share
of each trial's own total, so a 10k-example and a 1M-example study prune at the same points.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial
from optuna.trial import TrialState
from optuna.trial import create_trial

from search.record import attrs
from search.sampling.peer_pruner import PeerMedianPruner
from search.sampling.peer_pruner import pruning_record
from search.sampling.peer_pruner import read_record
from search.sampling.pruners import pruner_from_section
from search.spec.load import load_spec
from search.spec.options import RunOptions
from search.spec.study_spec import PrunerSection
from search.spec.study_spec import SpecError
from search.spec.study_spec import shipped_spec_path
from search.train.metrics import retrieval_metrics
from search.worker.isolation import TrialOutcome
from search.worker.trainer import TrainHooks
from search.worker.worker import Worker
from storage import compat

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODELS = ["small", "big"]
TOTAL = 100_000  # examples of a whole trial
STEPS = [10_000, 20_000, 30_000, 40_000]


def _done(model: str, values: dict[int, float], stage: str | None = None) -> FrozenTrial:
    """A completed trial of ``model`` with these reports."""
    return create_trial(
        value=values[max(values)],
        params={"model": model},
        distributions={"model": CategoricalDistribution(MODELS)},
        intermediate_values=values,
        user_attrs={attrs.STAGE: stage} if stage else {},
    )


def _running(
    model: str,
    values: dict[int, float],
    *,
    se: float | None = 0.0,
    total: int | None = TOTAL,
    stage: str | None = None,
) -> FrozenTrial:
    """A running trial of ``model`` whose last report is the largest step of ``values``."""
    record: dict[str, Any] = {"se": {str(s): se for s in values} if se is not None else {}}
    if total is not None:
        record[attrs.REPORT_EXAMPLES_TOTAL] = total
    return create_trial(
        state=TrialState.RUNNING,
        params={"model": model},
        distributions={"model": CategoricalDistribution(MODELS)},
        intermediate_values=values,
        user_attrs={attrs.STAGE: stage} if stage else {},
        system_attrs={attrs.SYSTEM_PRUNING: record},
    )


def _study(done: list[FrozenTrial], direction: str = "maximize") -> optuna.Study:
    study = optuna.create_study(direction=direction)
    study.add_trials(done)
    return study


def _curve(start: float, slope: float) -> dict[int, float]:
    return {s: start + slope * i for i, s in enumerate(STEPS)}


SMALL = [_done("small", _curve(0.50 + 0.01 * i, 0.01)) for i in range(6)]  # fast starters


def test_a_slow_starting_big_model_is_held_to_its_own_peers() -> None:
    big = _running("big", _curve(0.20, 0.05), se=0.01)  # 0.35 at 30k: far below the small ones
    pruner = PeerMedianPruner(peers="model", n_startup_trials=3, warmup_share=0.2, noise_z=1.0)
    # Against all trials (Optuna's median, or peers: study) the big model is pruned at once.
    assert PeerMedianPruner(peers="study", n_startup_trials=3, warmup_share=0.2).prune(
        _study(SMALL), big
    )
    median = optuna.pruners.MedianPruner(n_startup_trials=3)
    assert median.prune(_study(SMALL), big)
    # Held to its own model: no pruning while it has fewer than 3 completed peers.
    for n in range(3):
        peers = [_done("big", _curve(0.21 + 0.01 * i, 0.06)) for i in range(n)]
        assert not pruner.prune(_study(SMALL + peers), big), n
    # With 3 big peers clearly ahead at its step (0.38..0.40 against 0.35, SE 0.01): pruned.
    peers = [_done("big", _curve(0.20 + 0.01 * i, 0.06)) for i in range(3)]
    assert pruner.prune(_study(SMALL + peers), big)
    # One that keeps up with its peers is not, however far below the small models it is.
    level = _running("big", _curve(0.20, 0.065), se=0.01)
    assert not pruner.prune(_study(SMALL + peers), level)


def _world(pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """8 small-model trials that start fast and plateau (0.50 -> 0.55..0.564), then 5
    big-model trials that start slow (0.20) and mostly end higher (0.50..0.70; the 4th is the
    study's best), each reporting every 10k of 100k examples with an SE of 0.02 through
    Optuna's trial API, as the worker's hooks do."""
    study = optuna.create_study(direction="maximize", pruner=pruner)
    storage = compat.study_storage(study)
    runs = [("small", 0.50, 0.05 + 0.002 * i) for i in range(8)]
    runs += [("big", 0.20, gain) for gain in (0.40, 0.45, 0.42, 0.50, 0.30)]
    for model, start, gain in runs:
        study.enqueue_trial({"model": model})
        trial = study.ask()
        trial.suggest_categorical("model", MODELS)  # the enqueued model
        record = None
        for step in range(10_000, 100_001, 10_000):
            value = start + gain * step / 100_000
            trial.report(value, step)
            report = {"ndcg@10_se": 0.02, attrs.REPORT_EXAMPLES_TOTAL: 1e5}
            record = pruning_record(record, step, report, "ndcg@10") or record
            storage.set_trial_system_attr(compat.trial_id(trial), attrs.SYSTEM_PRUNING, record)
            if trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial, value)
    return study


def test_the_slow_starting_big_model_world_keeps_its_best_model() -> None:
    median = _world(optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=10_000))
    big = [t for t in median.trials if t.params["model"] == "big"]
    assert [t.state for t in big] == [TrialState.PRUNED] * 5  # the big model is lost
    assert median.best_value == pytest.approx(0.564)  # a small model wins
    peer = _world(PeerMedianPruner(peers="model", n_startup_trials=3, warmup_share=0.2))
    big = [t for t in peer.trials if t.params["model"] == "big"]
    assert [t.state for t in big] == [TrialState.COMPLETE] * 4 + [TrialState.PRUNED]
    assert peer.best_trial.number == big[3].number and peer.best_value == pytest.approx(0.70)
    assert big[4].last_step == 20_000  # behind its own peers by > 1 SE, past the warm-up
    assert all(t.state == TrialState.COMPLETE for t in peer.trials if t not in big)


NOISE = [(0.02, 1.0, True), (0.04, 1.0, False), (0.02, 2.0, False), (0.0, 1.0, True)]
NOISE += [(None, 1.0, True), (0.02, 0.0, True)]  # no SE recorded: plain median; z 0: the same


@pytest.mark.parametrize(("se", "z", "pruned"), NOISE)
def test_behind_by_less_than_z_standard_errors_is_not_pruned(
    se: float | None, z: float, pruned: bool
) -> None:
    peers = [_done("small", {30_000: v}) for v in (0.50, 0.52, 0.54)]  # median 0.52
    trial = _running("small", {30_000: 0.49}, se=se)  # behind by 0.03
    pruner = PeerMedianPruner(n_startup_trials=3, warmup_share=0.2, noise_z=z)
    assert pruner.prune(_study(peers), trial) is pruned


def test_a_trial_level_with_or_ahead_of_the_median_is_never_pruned() -> None:
    peers = [_done("small", {30_000: v}) for v in (0.50, 0.52, 0.54)]
    pruner = PeerMedianPruner(n_startup_trials=1, noise_z=0.0)
    assert not pruner.prune(_study(peers), _running("small", {30_000: 0.52}))
    assert not pruner.prune(_study(peers), _running("small", {30_000: 0.60}))
    # Peers that did not report at this step do not count.
    assert not pruner.prune(_study(peers), _running("small", {35_000: 0.10}))


@pytest.mark.parametrize("total", [10_000, 1_000_000])
def test_the_warmup_is_a_share_of_the_trials_own_total(total: int) -> None:
    shares = [0.1, 0.19, 0.2, 0.5, 0.9]
    steps = [int(total * s) for s in shares]
    peers = [_done("small", {s: 0.6 for s in steps}) for _ in range(3)]
    pruner = PeerMedianPruner(n_startup_trials=3, warmup_share=0.2, noise_z=1.0)
    decisions = [
        pruner.prune(_study(peers), _running("small", {s: 0.3}, se=0.01, total=total))
        for s in steps
    ]
    assert decisions == [False, False, True, True, True]


def test_without_a_total_the_warmup_is_n_warmup_steps() -> None:
    peers = [_done("small", {s: 0.6 for s in STEPS}) for _ in range(3)]
    pruner = PeerMedianPruner(n_startup_trials=3, warmup_share=0.9, n_warmup_steps=20_000)
    decisions = [
        pruner.prune(_study(peers), _running("small", {s: 0.3}, total=None)) for s in STEPS
    ]
    assert decisions == [False, True, True, True]


def test_minimize_flips_the_direction() -> None:
    peers = [_done("small", {30_000: v}) for v in (1.0, 1.1, 1.2)]  # median 1.1
    pruner = PeerMedianPruner(n_startup_trials=3, warmup_share=0.2, noise_z=1.0)
    study = _study(peers, "minimize")
    assert pruner.prune(study, _running("small", {30_000: 1.2}, se=0.05))  # worse by 0.1
    assert not pruner.prune(study, _running("small", {30_000: 1.14}, se=0.05))  # within 1 SE
    assert not pruner.prune(study, _running("small", {30_000: 0.5}, se=0.0))  # better


def test_peers_by_stage_and_by_study() -> None:
    baseline = [_done("small", {30_000: 0.6}, stage="baseline") for _ in range(3)]
    big_safe = [_done("big", {30_000: 0.3 + 0.01 * i}, stage="big-safe") for i in range(2)]
    trial = _running("big", {30_000: 0.25}, stage="big-safe")
    by_stage = PeerMedianPruner(peers="stage", n_startup_trials=3, warmup_share=0.2, noise_z=0.0)
    by_study = PeerMedianPruner(peers="study", n_startup_trials=3, warmup_share=0.2, noise_z=0.0)
    study = _study(baseline + big_safe)
    assert not by_stage.prune(study, trial)  # 2 big-safe peers: not yet a reference
    assert by_study.prune(study, trial)  # the baseline's 0.6 would prune it
    study.add_trial(_done("big", {30_000: 0.32}, stage="big-safe"))
    assert by_stage.prune(study, trial)  # 0.25 against its stage's median 0.31
    level = _running("big", {30_000: 0.31}, stage="big-safe")
    assert not by_stage.prune(study, level)
    # A trial of another stage (refine) with the same model is not held to big-safe.
    assert not by_stage.prune(study, _running("big", {30_000: 0.25}, stage="refine"))


def test_a_nan_report_past_the_warmup_is_pruned() -> None:
    pruner = PeerMedianPruner(n_startup_trials=3, warmup_share=0.2)
    study = _study([])
    assert not pruner.prune(study, _running("small", {10_000: math.nan}))  # in the warm-up
    assert pruner.prune(study, _running("small", {30_000: math.nan}))


def test_the_record_is_written_once_per_report_with_the_total_once() -> None:
    record = None
    writes = 0
    for step in (5000, 10000, 15000):
        report = {"ndcg@10": 0.4, "ndcg@10_se": 0.02, attrs.REPORT_EXAMPLES_TOTAL: 1e5}
        folded = pruning_record(record, step, report, "ndcg@10")
        if folded is not None:
            record, writes = folded, writes + 1
    assert writes == 3 and record == {
        attrs.REPORT_EXAMPLES_TOTAL: 100_000,
        "se": {"5000": 0.02, "10000": 0.02, "15000": 0.02},
    }
    assert pruning_record(record, 15000, {"ndcg@10": 0.4}, "ndcg@10") is None  # nothing new
    assert pruning_record(None, 1, {"ndcg@10": 0.4}, "ndcg@10") is None  # a bare objective
    trial = _running("small", {10_000: 0.5}, se=0.03, total=7)
    assert read_record(trial) == (7, {"10000": 0.03})


def test_the_standard_error_is_the_bootstrap_one() -> None:
    gen = torch.Generator().manual_seed(0)
    n_queries, n_docs = 200, 30
    scores = torch.randn(n_queries, n_docs, generator=gen)
    relevant = [{int(torch.randint(n_docs, (1,), generator=gen))} for _ in range(n_queries)]
    m = retrieval_metrics(scores, relevant, k_values=(10,))
    # The SE of the mean of the per-query values, resampled: the analytic one within 5%.
    one = [retrieval_metrics(scores[q : q + 1], [relevant[q]], k_values=(10,)) for q in range(200)]
    per_query = torch.tensor([m_q["ndcg@10"] for m_q in one], dtype=torch.float64)
    picks = torch.randint(n_queries, (4000, n_queries), generator=gen)
    bootstrap = per_query[picks].mean(dim=1).std().item()
    assert m["ndcg@10_se"] == pytest.approx(bootstrap, rel=0.05)
    assert m["ndcg@10"] == pytest.approx(per_query.mean().item())
    assert {k for k in m if k.endswith("_se")} == {"ndcg@10_se", "mrr@10_se", "recall@10_se"}


# ------------------------------------------------------------------ the spec


def test_the_spec_builds_it_and_both_shipped_specs_use_it_alike() -> None:
    pruner = pruner_from_section(
        PrunerSection(type="peer_median", peers="stage", warmup_share=0.3, noise_z=2.0)
    )
    assert isinstance(pruner, PeerMedianPruner)
    assert (pruner.peers, pruner.warmup_share, pruner.noise_z) == ("stage", 0.3, 2.0)
    names = ("ko-retrieval", "ko-retrieval-large-batch")
    shipped = [load_spec(shipped_spec_path(n)).pruner for n in names]
    assert shipped[0] == shipped[1]  # one set of values: change them together
    assert shipped[0].type == "peer_median" and shipped[0].peers == "model"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("warmup_share", 1.0, ["pruner.warmup_share", "1.0"]),
        ("warmup_share", -0.1, ["pruner.warmup_share", "-0.1"]),
        ("noise_z", -1, ["pruner.noise_z", "-1"]),
        ("peers", "team", ["pruner.peers", "team"]),
        ("type", "peers", ["pruner.type", "peers"]),
    ],
)
def test_bad_pruner_values_are_one_line_naming_field_and_value(
    tmp_path: Path, field: str, value: object, expected: list[str]
) -> None:
    raw = yaml.safe_load(shipped_spec_path("ko-retrieval").read_text())
    raw["pruner"][field] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for part in expected:
        assert part in message


# ------------------------------------------------------------------ through the worker's step


def test_the_step_records_se_and_total_and_the_pruner_reads_them(tmp_path: Path) -> None:
    """A worker's trials report through the step's hooks: one ``search:pruning`` write per
    report, and the pruner decides on what was recorded (noise spares, a large gap prunes)."""
    spec = load_spec(FIXTURES / "tiny_workers.yaml")
    pruner = PrunerSection(type="peer_median", n_startup_trials=2, warmup_share=0.2)
    spec = spec.model_copy(update={"pruner": pruner})
    opts = RunOptions(
        storage_url=f"sqlite:///{tmp_path}/p.db",
        n_trials=4,
        device="cpu",
        objective="slow_objective:train",  # not the real loop: no weights needed here
    )
    # Trials 0, 1 complete at 0.6; the 3rd reports 0.55 with SE 0.1 (kept); the 4th 0.3 (pruned).
    plan = [(0.6, 0.01), (0.6, 0.01), (0.55, 0.1), (0.3, 0.01)]
    writes: list[str] = []

    def trainer(cfg: Any, hooks: TrainHooks) -> TrialOutcome:
        value, se = plan.pop(0)
        for step in (10_000, 20_000, 30_000):
            metrics = {"ndcg@10": value, "ndcg@10_se": se, attrs.REPORT_EXAMPLES_TOTAL: 1e5}
            if hooks.report_partial(step, metrics):
                return TrialOutcome(status="pruned")
        return TrialOutcome(status="complete", value=value, metrics={"ndcg@10": value})

    worker = Worker.open(spec, opts, trainer=trainer)
    storage: Any = worker.storage
    write = storage.set_trial_attrs  # write_record's one transaction

    def counted(trial_id: int, user: Any, system: Any) -> None:
        writes.extend(key for key in system if key == attrs.SYSTEM_PRUNING)
        write(trial_id, user, system)

    storage.set_trial_attrs = counted
    try:
        while not worker.step().stopped:
            pass
    finally:
        worker.close()
    study = optuna.load_study(study_name=spec.study.name, storage=opts.storage_url)
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED]
    assert len(writes) == 3 * 3 + 2  # one per report; the 4th is pruned at 20k (its warm-up)
    total, se = read_record(trials[2])
    assert total == 100_000 and se == {"10000": 0.1, "20000": 0.1, "30000": 0.1}
    assert sorted(trials[3].intermediate_values) == [10_000, 20_000]
