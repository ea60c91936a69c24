"""The forkserver imports with collection off, then freezes what it imported: a trial's
collections no longer walk torch's and transformers' objects, and collection is on in trials."""

from __future__ import annotations

import gc
from typing import Any

from _factories import trial_config

from search.record.config import TrialConfig
from search.worker.isolation import run_isolated

HERE = "test_forkserver_gc"  # the child imports the objective below by this module name


def gc_state(cfg: TrialConfig, *, report: Any = None, on_phase: Any = None) -> Any:
    import sys

    frozen = gc.get_freeze_count()
    gc.collect()  # a full collection walks only what the trial made
    return {
        "metrics": {
            "enabled": float(gc.isenabled()),
            "frozen": float(frozen),
            "tracked": float(len(gc.get_objects())),
            "torch": float("torch" in sys.modules),
        }
    }


def test_trials_inherit_a_frozen_preload_and_collect_what_they_make() -> None:
    out = run_isolated(trial_config(), objective=f"{HERE}:gc_state")
    assert out.status == "complete", out.error
    m = out.metrics
    assert m["enabled"] == 1.0 and m["torch"] == 1.0
    # torch, transformers and optuna are frozen: far more than the objects left to walk
    assert m["frozen"] > 100_000
    assert m["tracked"] < m["frozen"] / 4
