"""The training loop on a tiny replica and KLUE-NLI: learns, prunes, names phases, fails fast."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import optuna
import pytest
import torch
from _factories import trial_config

from search.record.config import TrialConfig
from search.record.models import MODELS
from search.record.precision import autocast_dtype
from search.record.precision import cpu_has_native_bf16
from search.record.precision import resolve_device
from search.train.data import EvalSet
from search.train.data import TrainExample
from search.train.data import load_eval
from search.train.data import load_train
from search.train.encoder import BiEncoder
from search.train.loop import train
from search.train.metrics import evaluate
from search.train.nli_retrieval import klue_nli_to_retrieval
from search.train.tiny import build_tiny_replica

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODEL = "multilingual-minilm"  # mean pooling: a random tiny CLS-pooled replica collapses

pytestmark = pytest.mark.train


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Every test of this module on one torch thread (conftest)."""


@pytest.fixture(scope="module")
def klue(
    tmp_path_factory: pytest.TempPathFactory, klue_json: Path
) -> tuple[list[TrainExample], EvalSet, Path]:
    """KLUE-NLI as retrieval (premise -> entailment, contradiction = hard negative)."""
    work = tmp_path_factory.mktemp("klue")
    train_path, eval_dir = klue_nli_to_retrieval(klue_json, work / "data", eval_fraction=0.2)
    examples = load_train(train_path)
    texts = [t for e in examples for t in (e.query, e.positive, *e.negatives)]
    replica = build_tiny_replica(MODELS[MODEL], work / "replicas", texts, vocab_size=2000)
    return examples, load_eval(eval_dir), replica


def _cfg(replica: Path, **changes: object) -> TrialConfig:
    base: dict[str, object] = dict(
        model=MODEL,
        model_path=str(replica),
        batch_size=16,
        max_len=48,
        lr=1e-3,
        warmup_ratio=0.1,
        weight_decay=0.01,
        amp=True,
        hard_negatives=1,
        train_path="unused.jsonl",
    )
    return trial_config(**(base | changes))


def _small_eval(eval_set: EvalSet, n_queries: int = 16) -> EvalSet:
    qids = list(eval_set.queries)[:n_queries]
    qrels = {q: eval_set.qrels[q] for q in qids}
    docs = {d for q in qids for d in qrels[q]} | set(list(eval_set.corpus)[:48])
    return EvalSet(
        {d: eval_set.corpus[d] for d in docs}, {q: eval_set.queries[q] for q in qids}, qrels
    )


def test_training_on_klue_raises_ndcg(klue: tuple[list[TrainExample], EvalSet, Path]) -> None:
    examples, eval_set, replica = klue
    cfg = _cfg(replica, epochs=2, batch_size=32, lr=1e-3, max_len=64)
    torch.manual_seed(cfg.seed)
    untrained = evaluate(BiEncoder.from_config(cfg), eval_set, max_len=cfg.max_len)
    result = train(cfg, train_examples=examples, eval_set=eval_set)
    assert [h["epoch"] for h in result.history] == [1.0, 2.0]
    # Measured on CPU: untrained 0.388, after 2 epochs 0.645-0.648 (seeds 0-2); the margin
    # asked for is under half of that gain.
    assert result.metrics["ndcg@10"] > untrained["ndcg@10"] + 0.1
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.samples_per_s > 0 and result.peak_memory_mb > 0 and result.seconds > 0
    assert {"ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10", "loss"} <= set(
        result.metrics
    )


def test_report_true_prunes_after_first_epoch(
    klue: tuple[list[TrainExample], EvalSet, Path],
) -> None:
    examples, eval_set, replica = klue
    seen: list[tuple[int, dict[str, float]]] = []

    def report(epoch: int, metrics: dict[str, float]) -> bool:
        seen.append((epoch, metrics))
        return True

    with pytest.raises(optuna.TrialPruned):
        train(
            _cfg(replica, epochs=3),
            train_examples=examples[:48],
            eval_set=_small_eval(eval_set),
            report=report,
        )
    assert [epoch for epoch, _ in seen] == [1]
    assert "ndcg@10" in seen[0][1]


def test_report_false_runs_every_epoch(klue: tuple[list[TrainExample], EvalSet, Path]) -> None:
    examples, eval_set, replica = klue
    epochs: list[int] = []
    result = train(
        _cfg(replica, epochs=2),
        train_examples=examples[:32],
        eval_set=_small_eval(eval_set),
        report=lambda epoch, _: bool(epochs.append(epoch)),  # type: ignore[func-returns-value]
    )
    assert epochs == [1, 2]
    assert len(result.history) == 2


def test_on_phase_sees_phases_in_order(klue: tuple[list[TrainExample], EvalSet, Path]) -> None:
    examples, eval_set, replica = klue
    phases: list[str] = []
    train(
        _cfg(replica, epochs=2),
        train_examples=examples[:32],  # two steps per epoch
        eval_set=_small_eval(eval_set),
        on_phase=phases.append,
    )
    step = ["forward", "backward", "optimizer"]
    assert phases == ["load", *step, *step, "eval", *step, *step, "eval"]


def _record_shapes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    shapes: list[tuple[int, int]] = []
    forward = BiEncoder.forward

    def recording(self: BiEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor):  # type: ignore[no-untyped-def]
        if self.training:
            shapes.append(tuple(input_ids.shape))  # type: ignore[arg-type]
        return forward(self, input_ids, attention_mask)

    monkeypatch.setattr(BiEncoder, "forward", recording)
    return shapes


def test_fail_fast_first_batch_has_worst_case_shape(
    klue: tuple[list[TrainExample], EvalSet, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    examples, eval_set, replica = klue
    shapes = _record_shapes(monkeypatch)
    cfg = _cfg(replica, batch_size=8, max_len=40, hard_negatives=1)
    train(cfg, train_examples=examples[:32], eval_set=_small_eval(eval_set))
    # Step 1: queries (batch, max_len), then positives + one negative each (2 * batch, max_len).
    assert shapes[0] == (8, 40)
    assert shapes[1] == (16, 40)
    # The other steps pad to their own longest text (KLUE sentences are shorter than 40).
    assert len(shapes) == 2 * 4
    assert all(rows in (8, 16) for rows, _ in shapes)
    assert any(width < 40 for _, width in shapes[2:])


def test_without_fail_fast_first_batch_is_dynamic(
    klue: tuple[list[TrainExample], EvalSet, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    examples, eval_set, replica = klue
    shapes = _record_shapes(monkeypatch)
    cfg = _cfg(replica, batch_size=8, max_len=128, hard_negatives=0, fail_fast=False)
    train(cfg, train_examples=examples[:16], eval_set=_small_eval(eval_set))
    assert [rows for rows, _ in shapes] == [8, 8, 8, 8]  # in-batch only: no negatives
    assert all(width < 128 for _, width in shapes)


def test_last_incomplete_batch_dropped_unless_data_is_smaller(
    klue: tuple[list[TrainExample], EvalSet, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    examples, eval_set, replica = klue
    shapes = _record_shapes(monkeypatch)
    cfg = _cfg(replica, batch_size=16, hard_negatives=0, fail_fast=False)
    train(cfg, train_examples=examples[:40], eval_set=_small_eval(eval_set))
    assert [rows for rows, _ in shapes] == [16, 16, 16, 16]  # 2 full batches; 8 left out
    shapes.clear()
    train(cfg, train_examples=examples[:10], eval_set=_small_eval(eval_set))
    assert [rows for rows, _ in shapes] == [10, 10]  # smaller than a batch: used whole


def test_same_seed_same_result(klue: tuple[list[TrainExample], EvalSet, Path]) -> None:
    examples, eval_set, replica = klue
    small = _small_eval(eval_set)
    cfg = _cfg(replica, epochs=2)
    a = train(cfg, train_examples=examples[:48], eval_set=small)
    b = train(cfg, train_examples=examples[:48], eval_set=small)
    c = train(dataclasses.replace(cfg, seed=1), train_examples=examples[:48], eval_set=small)
    assert a.history == b.history
    assert a.history != c.history


def test_resolve_device_and_precision_rule() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, False, hidden=1024) is None
    assert autocast_dtype(cpu, True, hidden=64) is None  # too small to gain from bf16
    expected_dtype = torch.bfloat16 if cpu_has_native_bf16() else None
    assert autocast_dtype(cpu, True, hidden=1024) is expected_dtype
