"""Prune sooner: every trial reports on one step axis, training examples seen.

``training.eval_every_steps`` scores a fixed sample of the eval set between epochs (reported
at multiples of N examples), the epoch's full evaluation is reported at ``epoch x`` training
examples, whatever the batch size; and each ``pruner.type`` builds its Optuna pruner.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import optuna
import pytest
import torch
from _factories import trial_config

from search.record import attrs
from search.record.models import MODELS
from search.sampling.peer_pruner import PeerMedianPruner
from search.sampling.peer_pruner import read_record
from search.sampling.pruners import pruner_from_section
from search.spec.load import load_spec
from search.spec.options import DEFAULT_CACHE
from search.spec.options import RunOptions
from search.spec.study_spec import PrunerSection
from search.train.data import load_eval
from search.train.data import load_train
from search.train.loop import train
from search.train.partial_eval import ExamplesAxis
from search.train.partial_eval import eval_sample
from search.train.tiny import build_tiny_replica
from search.worker.runner import run_study

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning"),
]

DEMO = Path(__file__).resolve().parents[1] / "search" / "studies" / "data" / "ko-demo"
MODEL = "multilingual-minilm"
N_TRAIN = 40  # examples per epoch; eval every 16: sooner points 16, 32 | 48, 64; epochs 40, 80
SOONER = [16, 32, 48, 64]


@pytest.mark.parametrize(
    ("section", "kind", "checks"),
    [
        (PrunerSection(), optuna.pruners.MedianPruner, {"_n_startup_trials": 4}),
        (
            PrunerSection(type="successive_halving", min_resource=64, reduction_factor=2),
            optuna.pruners.SuccessiveHalvingPruner,
            {"_min_resource": 64, "_reduction_factor": 2},
        ),
        (
            PrunerSection(type="hyperband", min_resource=32, max_resource=640),
            optuna.pruners.HyperbandPruner,
            {"_min_resource": 32, "_max_resource": 640, "_reduction_factor": 3},
        ),
        (PrunerSection(type="none"), optuna.pruners.NopPruner, {}),
        (
            PrunerSection(type="peer_median", n_startup_trials=3, warmup_share=0.25),
            PeerMedianPruner,
            {"n_startup_trials": 3, "warmup_share": 0.25, "peers": "model", "noise_z": 1.0},
        ),
    ],
)
def test_each_pruner_type_builds(section: PrunerSection, kind: type, checks: dict) -> None:
    pruner = pruner_from_section(section)
    assert type(pruner) is kind
    for name, value in checks.items():
        assert getattr(pruner, name) == value


def test_the_examples_axis_is_the_same_for_every_batch_size() -> None:
    def points(batch: int) -> tuple[list[int], list[int]]:
        axis = ExamplesAxis(N_TRAIN, 16)
        sooner, ends = [], []
        for epoch in (1, 2):
            for seen in range(batch, N_TRAIN // batch * batch + 1, batch):  # drop-last
                if (point := axis.due(epoch, seen)) is not None:
                    sooner.append(point)
            ends.append(axis.epoch_end(epoch))
        return sooner, ends

    for batch in (4, 8, 16):  # a batch above 16 examples reports on fewer of the points
        assert points(batch) == (SOONER, [40, 80]), batch
    assert ExamplesAxis(N_TRAIN, None).due(1, 40) is None


def test_the_eval_sample_is_fixed_and_keeps_the_relevant_documents() -> None:
    full = load_eval(DEMO, "test")
    sample = eval_sample(full, 20)
    assert sample == eval_sample(full, 20)  # the same for every trial
    assert len(sample.queries) == 20 and len(sample.corpus) < len(full.corpus)
    assert all(d in sample.corpus for q in sample.queries for d in sample.qrels[q])
    assert eval_sample(full, 10_000) is full  # small enough: the whole set


def _replica(tmp_path: Path) -> Path:
    texts = [t for e in load_train(DEMO / "train.jsonl") for t in (e.query, e.positive)]
    cache = Path(os.environ.get("SEARCH_CACHE", DEFAULT_CACHE))
    return build_tiny_replica(MODELS[MODEL], cache / "tiny", texts)


@pytest.mark.train
def test_train_reports_sooner_on_the_examples_axis(tmp_path: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    cfg = trial_config(
        model=MODEL,
        model_path=str(_replica(tmp_path)),
        lr=1e-3,
        epochs=2,
        train_path=str(DEMO / "train.jsonl"),
        eval_dir=str(DEMO),
        max_train_samples=N_TRAIN,
        eval_every_steps=16,
        eval_sample_queries=20,
    )
    for batch in (8, 16):
        sooner: list[int] = []
        epochs: list[float] = []

        def report_partial(step: int, metrics: dict[str, float]) -> bool:
            assert 0.0 <= metrics["ndcg@10"] <= 1.0
            assert 0.0 <= metrics["ndcg@10_se"] <= 0.5  # the sample's noise, 20 queries
            assert metrics[attrs.REPORT_EXAMPLES_TOTAL] == 2 * N_TRAIN  # the run's total
            sooner.append(step)  # noqa: B023 - read in this iteration
            return False

        def report(epoch: int, metrics: dict[str, float]) -> bool:
            assert 0.0 <= metrics["ndcg@10_se"] <= 0.5
            assert metrics[attrs.REPORT_EXAMPLES_TOTAL] == 2 * N_TRAIN
            epochs.append(metrics["examples_seen"])  # noqa: B023
            return False

        run = dataclasses.replace(cfg, batch_size=batch)
        result = train(run, report=report, report_partial=report_partial)
        assert sooner == SOONER, batch
        assert epochs == [40.0, 80.0], batch
        assert [h["examples_seen"] for h in result.history] == [40.0, 80.0]  # epochs only
        # The standard errors and the total go to the reports only, not to the record's metrics.
        assert not [k for h in result.history for k in h if k.endswith("_se")]
        assert "ndcg@10_se" not in result.metrics and "examples_total" not in result.metrics


@pytest.mark.train
def test_a_study_records_intermediate_values_in_examples_seen(tmp_path: Path) -> None:
    path = tmp_path / "sooner.yaml"
    path.write_text(
        f"""study: {{name: sooner, n_trials: 1}}
models: {{{MODEL}: {{}}}}
space:
  batch_size: [16]
  max_len: [32]
  lr: {{low: 1.0e-4, high: 1.0e-3, log: true}}
  temperature: {{low: 0.02, high: 0.1, log: true}}
  warmup_ratio: {{low: 0.0, high: 0.1}}
  weight_decay: {{low: 0.0, high: 0.1}}
training: {{epochs: 2, amp: false, hard_negatives: 0, seed: 0, max_train_samples: {N_TRAIN},
           eval_every_steps: 16, eval_sample_queries: 20}}
data: {{train: {DEMO / "train.jsonl"}, eval: {DEMO}, split: test}}
sampler: {{type: random}}
pruner: {{type: successive_halving, min_resource: 16}}
""",
        encoding="utf-8",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    opts = RunOptions(
        storage_url=f"sqlite:///{tmp_path}/s.db",
        tiny=True,
        device="cpu",
        cache_dir=Path(os.environ.get("SEARCH_CACHE", DEFAULT_CACHE)),
    )
    summary = run_study(load_spec(path), opts)
    (trial,) = summary.study.get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert sorted(trial.intermediate_values) == [16, 32, 40, 48, 64, 80]
    assert trial.value == trial.intermediate_values[80]  # the last full evaluation
    # What the peer median pruner reads: the run's total, and each report's standard error.
    total, se = read_record(trial)
    assert total == 2 * N_TRAIN
    assert sorted(se, key=int) == ["16", "32", "40", "48", "64", "80"]
    assert all(0.0 <= v <= 0.5 for v in se.values()) and any(v > 0 for v in se.values())
