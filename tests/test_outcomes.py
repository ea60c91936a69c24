"""Every way a trial ends writes its outcome, and the report's counts add up.

The trials run through the real worker step (``Worker.step``) in real isolated children; the
objective below ends each trial one way (complete, pruned, a real allocator OOM under the
worker's memory limit, an exception, a SIGKILL), and one reports
metrics without the study's, so the worker's own pruner hook fails mid-trial. The stale
ending (a SIGKILLed worker) is caused in tests/test_child_dies.py; the hand-back on SIGTERM
/ SIGINT in tests/test_worker_faults.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from search.observe.report import study_report
from search.record import attrs
from search.record.trial_record import outcome_of
from search.spec.load import load_spec
from search.spec.options import RunOptions
from search.worker.worker import Worker

HERE = "test_outcomes"  # the child imports the objective below by this module name
SPEC = Path(__file__).parent / "fixtures" / "tiny_workers.yaml"  # training seed 42
SEED = 42
ENDINGS = ["complete", "pruned", "oom", "raise", "kill", "badreport", "complete"]

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def ending_train(cfg: Any, *, report: Any = None, on_phase: Any = None) -> dict[str, Any]:
    """End trial ``cfg.seed - SEED`` the way ``ENDINGS`` says (in the trial's child)."""
    ending = ENDINGS[cfg.seed - SEED]
    if on_phase is not None:
        on_phase("forward")
    if ending == "pruned":
        raise optuna.TrialPruned("pruned by the objective")
    if ending == "oom":
        import torch

        held = []
        while True:  # the worker's memory limit (RLIMIT_AS) ends it
            held.append(torch.ones(64 * 2**20 // 4))
    if ending == "raise":
        raise ValueError("the objective broke")
    if ending == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if ending == "badreport" and report is not None:
        report(0, {"loss": 1.0})  # no ndcg@10: the worker's hook raises KeyError
    return {"metrics": {"ndcg@10": 0.5, "mrr@10": 0.4}, "peak_memory_mb": 1.0}


def test_every_ending_writes_its_outcome_and_the_report_adds_up(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    spec = load_spec(SPEC)
    opts = RunOptions(
        storage_url=f"sqlite:///{tmp_path}/endings.db",
        n_trials=len(ENDINGS) - 1,  # the worker-error trial is re-queued: it spends nothing
        device="cpu",
        objective=f"{HERE}:ending_train",
        memory_limit=256 * 2**20,
        use_estimate=False,  # the limit is for the OOM ending, not for the preflight
        use_frontier=False,
    )
    worker = Worker.open(spec, opts)
    errors: list[BaseException] = []
    try:
        while True:
            try:
                if worker.step().stopped:
                    break
            except KeyError as exc:  # the worker's own error: the step raises it, as it should
                errors.append(exc)
    finally:
        worker.close()
    assert [str(e) for e in errors] == ["'ndcg@10'"]
    study = optuna.load_study(study_name=spec.study.name, storage=opts.storage_url)
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    stored = [t.user_attrs.get(attrs.OUTCOME) for t in trials]
    expected = ["complete", "pruned", "oom", "failed", "failed", "failed", "complete"]
    assert stored == expected, [(t.number, t.state, t.user_attrs) for t in trials]
    assert [outcome_of(t) for t in trials] == expected
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.PRUNED,  # an OOM is an answer about memory
        *[TrialState.FAIL] * 3,
        TrialState.COMPLETE,
    ]
    errors_of = [str(t.user_attrs.get(attrs.ERROR, "")) for t in trials]
    assert errors_of[3].startswith("ValueError: the objective broke")
    assert errors_of[4].startswith("Killed: the trial process was killed by SIGKILL")
    assert errors_of[5] == "worker error: KeyError: 'ndcg@10'"
    assert trials[5].number in trials[6].system_attrs[attrs.RETRY_HISTORY]  # its re-run

    [row] = study_report(study)["models"]
    assert row["trials"] == len(ENDINGS)
    parts = ("complete", "pruned_early", "pruned_oom", "failed", "requeued", "running")
    assert {k: row[k] for k in parts} == {
        "complete": 2,
        "pruned_early": 1,
        "pruned_oom": 1,
        "failed": 2,
        "requeued": 1,
        "running": 0,
    }
    assert sum(row[k] for k in parts) == row["trials"]
