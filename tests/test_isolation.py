"""Trials in a child process: real OOMs under a memory limit, kills, failures, pruning."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest
from _factories import trial_config

from search.record.config import TrialConfig
from search.worker.isolation import run_isolated
from search.worker.isolation import warm_up

HERE = "test_isolation"  # the child imports the fake objectives below by this module name
MIB = 1024**2


def _cfg(**over: Any) -> TrialConfig:
    return trial_config(**{**dict(epochs=2), **over})


# ---------------------------------------------------------------- fake objectives (in the child)


def allocate_until_oom(cfg: TrialConfig, *, report: Any = None, on_phase: Any = None) -> Any:
    """Grow a list of 64 MiB tensors until the allocator refuses (a real OOM)."""
    import torch

    on_phase("load")
    on_phase("forward")
    blocks = []
    for _ in range(10_000):
        blocks.append(torch.ones(16 * MIB, dtype=torch.float32))
    return {"metrics": {"ndcg@10": 0.0}}


def kill_self(cfg: TrialConfig, *, report: Any = None, on_phase: Any = None) -> Any:
    on_phase("backward")
    os.kill(os.getpid(), signal.SIGKILL)


def raise_value_error(cfg: TrialConfig, *, report: Any = None, on_phase: Any = None) -> Any:
    on_phase("load")
    raise ValueError("bad data in line 3\nsecond line")


def report_epochs(cfg: TrialConfig, *, report: Any = None, on_phase: Any = None) -> Any:
    import optuna

    history = []
    for epoch in range(cfg.epochs):
        on_phase("eval")
        metrics = {"ndcg@10": 0.1 * (epoch + 1), "mrr@10": 0.05}
        history.append(metrics)
        if report(epoch, metrics):
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")
    return {"metrics": history[-1], "history": history, "peak_memory_mb": 12.5}


def slow_epochs(cfg: TrialConfig, *, report: Any = None, on_phase: Any = None) -> Any:
    """Report each epoch after a short sleep; write the pid to ``$ISOLATION_PID_FILE``."""
    import time

    Path(os.environ["ISOLATION_PID_FILE"]).write_text(str(os.getpid()))
    for epoch in range(cfg.epochs):
        time.sleep(0.2)
        report(epoch, {"ndcg@10": 0.1})
    return {"metrics": {"ndcg@10": 0.1}}


def oom_in_cause(cfg: TrialConfig, *, report: Any = None, on_phase: Any = None) -> Any:
    on_phase("optimizer")
    try:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    except RuntimeError as exc:
        raise ValueError("step failed") from exc


# ------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module", autouse=True)
def _forkserver() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warm_up(f"{HERE}:allocate_until_oom")


def test_memory_limit_causes_a_real_allocator_oom_with_its_phase() -> None:
    out = run_isolated(
        _cfg(), memory_limit_bytes=256 * MIB, objective=f"{HERE}:allocate_until_oom"
    )
    assert out.status == "oom"
    assert out.oom_kind == "real"
    assert out.phase == "forward"
    assert out.error is not None and "\n" not in out.error
    assert "can't allocate memory" in out.error or out.error.startswith("MemoryError")
    # The trial grew by about the limit, not more.
    assert out.peak_memory_mb is not None and out.baseline_memory_mb is not None
    assert out.peak_memory_mb - out.baseline_memory_mb < 256 + 64


def test_sigkilled_child_is_killed_and_the_worker_goes_on() -> None:
    out = run_isolated(_cfg(), objective=f"{HERE}:kill_self")
    assert out.status == "killed"
    assert out.exitcode == -signal.SIGKILL
    assert out.phase == "backward"
    assert out.error is not None and "SIGKILL" in out.error
    # Not an OOM: no oom_kill in the cgroup, host memory not low (host_oom_evidence: test_oom).
    assert out.oom_kind is None
    after = run_isolated(_cfg(epochs=1), objective=f"{HERE}:report_epochs")
    assert after.status == "complete"


def test_value_error_is_a_failure_with_a_one_line_error() -> None:
    out = run_isolated(_cfg(), objective=f"{HERE}:raise_value_error")
    assert out.status == "failed"
    assert out.oom_kind is None
    assert out.error == "ValueError: bad data in line 3 second line"
    assert out.phase == "load"


def test_oom_behind_another_exception_is_an_oom() -> None:
    out = run_isolated(_cfg(), objective=f"{HERE}:oom_in_cause")
    assert out.status == "oom"
    assert out.phase == "optimizer"


def test_reports_reach_the_parent_and_complete() -> None:
    seen: list[tuple[int, float]] = []

    def report(epoch: int, metrics: dict[str, float]) -> bool:
        seen.append((epoch, metrics["ndcg@10"]))
        return False

    out = run_isolated(_cfg(epochs=3), report=report, objective=f"{HERE}:report_epochs")
    assert out.status == "complete"
    assert [e for e, _ in seen] == [0, 1, 2]
    assert out.value == pytest.approx(0.3)
    assert len(out.history) == 3
    assert out.peak_memory_mb == 12.5


def test_report_true_prunes_the_trial() -> None:
    calls: list[int] = []

    def report(epoch: int, metrics: dict[str, float]) -> bool:
        calls.append(epoch)
        return epoch >= 1

    out = run_isolated(_cfg(epochs=5), report=report, objective=f"{HERE}:report_epochs")
    assert out.status == "pruned"
    assert calls == [0, 1]
    assert out.metrics["ndcg@10"] == pytest.approx(0.2)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_stop_kills_the_child_and_says_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISOLATION_PID_FILE", str(tmp_path / "pid"))
    seen: list[int] = []
    out = run_isolated(
        _cfg(epochs=500),
        report=lambda epoch, metrics: bool(seen.append(epoch)),
        objective=f"{HERE}:slow_epochs",
        stop=lambda: len(seen) >= 2,
    )
    assert out.status == "stopped" and len(seen) == 2
    assert not psutil.pid_exists(int((tmp_path / "pid").read_text()))  # killed and reaped


def test_an_error_in_report_stops_the_child_and_propagates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna

    monkeypatch.setenv("ISOLATION_PID_FILE", str(tmp_path / "pid"))

    def report(epoch: int, metrics: dict[str, float]) -> bool:
        raise optuna.exceptions.UpdateFinishedTrialError("failed as stale meanwhile")

    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        run_isolated(_cfg(epochs=500), report=report, objective=f"{HERE}:slow_epochs")
    assert not psutil.pid_exists(int((tmp_path / "pid").read_text()))


def test_timeout_kills_the_child() -> None:
    out = run_isolated(_cfg(), objective=f"{HERE}:sleep_forever", timeout=1.0)
    assert out.status == "killed"
    assert out.error is not None and out.error.startswith("timeout")


def sleep_forever(cfg: TrialConfig, *, report: Any = None, on_phase: Any = None) -> Any:
    import time

    time.sleep(600)


def test_unknown_objective_is_a_failure_not_a_crash() -> None:
    out = run_isolated(_cfg(), objective=f"{HERE}:no_such_function")
    assert out.status == "failed"
    assert out.error is not None and out.error.startswith("AttributeError")


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="module:function"):
        run_isolated(_cfg(), objective="no_colon")
    with pytest.raises(ValueError, match="memory_limit_bytes"):
        run_isolated(_cfg(), memory_limit_bytes=0)


def test_twenty_ooms_in_a_row_do_not_grow_the_worker() -> None:
    rss = psutil.Process().memory_info
    first = run_isolated(
        _cfg(), memory_limit_bytes=96 * MIB, objective=f"{HERE}:allocate_until_oom"
    )
    assert first.status == "oom"
    after_first = rss().rss
    for _ in range(19):
        out = run_isolated(
            _cfg(), memory_limit_bytes=96 * MIB, objective=f"{HERE}:allocate_until_oom"
        )
        assert out.status == "oom"
    after_twenty = rss().rss
    assert after_twenty <= 1.05 * after_first, (after_first, after_twenty)


def test_children_start_from_the_forkserver_not_the_worker() -> None:
    # The child's parent is the forkserver, a fresh interpreter: never a fork of this process.
    out = run_isolated(_cfg(), objective=f"{HERE}:parent_pid")
    assert out.status == "complete"
    assert out.metrics["ppid"] != float(os.getpid())
    assert Path("/proc").exists()


def parent_pid(cfg: TrialConfig, *, report: Any = None, on_phase: Any = None) -> Any:
    return {"metrics": {"ppid": float(os.getppid())}}


# ----------------------------------------------------- the real objective on a tiny replica


def _write_tiny_data(root: Path) -> tuple[Path, Path]:
    """A small Korean-syllable retrieval set: 64 training examples and a 40-doc BEIR split."""
    import json
    import random

    rng = random.Random(0)
    syllables = [chr(0xAC00 + i * 37) for i in range(300)]

    def sentence(words: int) -> str:
        return " ".join(
            "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(words)
        )

    (root / "eval" / "qrels").mkdir(parents=True)
    with open(root / "train.jsonl", "w", encoding="utf-8") as f:
        for _ in range(64):
            row = {"query": sentence(8), "positive": sentence(40), "negatives": [sentence(40)]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(root / "eval" / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i in range(40):
            f.write(json.dumps({"_id": f"d{i}", "text": sentence(30)}, ensure_ascii=False) + "\n")
    with open(root / "eval" / "queries.jsonl", "w", encoding="utf-8") as f:
        for i in range(10):
            f.write(json.dumps({"_id": f"q{i}", "text": sentence(6)}, ensure_ascii=False) + "\n")
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(10))
    (root / "eval" / "qrels" / "test.tsv").write_text(qrels, encoding="utf-8")
    return root / "train.jsonl", root / "eval"


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import json

    from search.record.models import MODELS
    from search.train.tiny import build_tiny_replica

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    root = tmp_path_factory.mktemp("tiny")
    train_path, eval_dir = _write_tiny_data(root)
    rows = [json.loads(line) for line in train_path.read_text(encoding="utf-8").splitlines()]
    texts = [t for r in rows for t in (r["query"], r["positive"], *r["negatives"])]
    path = build_tiny_replica(MODELS["ko-simcse"], root / "cache", texts)
    return {"model_path": str(path), "train_path": str(train_path), "eval_dir": str(eval_dir)}


@pytest.mark.train
def test_real_training_runs_out_of_memory_under_the_limit(tiny_setup: dict[str, Any]) -> None:
    # 64 queries + 128 passages at 256 tokens need about 2 GiB here; the limit allows 640 MiB,
    # well above what loading takes (200 MiB was too tight in a full-suite run: OOM at load).
    cfg = _cfg(batch_size=64, max_len=256, hard_negatives=1, epochs=1, **tiny_setup)
    out = run_isolated(cfg, memory_limit_bytes=640 * MIB)
    assert out.status == "oom", out.error
    assert out.oom_kind == "real"
    assert out.phase in ("forward", "backward")  # the worst-case first step, not later
    # And the worker goes on: the same trial without the limit completes.
    ok = run_isolated(dataclasses_replace(cfg, batch_size=8, max_len=32), memory_limit_bytes=None)
    assert ok.status == "complete", ok.error
    assert ok.value is not None and 0.0 <= ok.value <= 1.0


def dataclasses_replace(cfg: TrialConfig, **changes: Any) -> TrialConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)
