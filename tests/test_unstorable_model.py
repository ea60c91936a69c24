"""A model that could not be stored is not kept, and never pushes a stored one out of the top K.

The store is made unwritable for real, in a way root cannot ignore (tests run as root, which
permissions do not stop): the artifact directory's path is a regular file while the best
trial's model is uploaded, then a directory again. Before the fix that trial still counted
among the top K, and the later trials kept 2 models instead of 3.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import optuna
import pytest
from _factories import trial_config

from search.observe.keep import ModelKeeper
from search.observe.keep import kept_models
from search.observe.keep import models_not_kept
from search.observe.report import study_report
from search.observe.report_view import report_text
from search.worker.isolation import TrialOutcome

K = 3


def _finish(keeper: ModelKeeper, value: float) -> int:
    """A trial that saved a model (the files the keeper checks), told, then kept or not."""
    trial = keeper.study.ask()
    cfg = keeper.prepare(trial_config(), trial.number)
    assert cfg.save_dir is not None
    Path(cfg.save_dir).mkdir()
    (Path(cfg.save_dir) / "modules.json").write_text("[]")
    (Path(cfg.save_dir) / "model.safetensors").write_bytes(b"\0" * 1024)
    keeper.study.tell(trial, value)
    outcome = TrialOutcome(status="complete", metrics={"ndcg@10": value})
    keeper.keep(trial.number, outcome, "ndcg@10")
    keeper.prune()
    return trial.number


def test_an_unstored_best_model_is_not_kept_and_pushes_none_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, store = f"sqlite:///{tmp_path}/keep.db", tmp_path / "store"
    study = optuna.create_study(study_name="keep", storage=url, direction="maximize")
    keeper = ModelKeeper(study, K, str(store))
    store.write_text("not a directory")  # the store's path is a file: nothing can go there
    with caplog.at_level(logging.WARNING, logger="search.observe.keep"):
        best = _finish(keeper, 0.9)
    os.remove(store)
    store.mkdir()  # writable again
    later = [_finish(keeper, value) for value in (0.5, 0.6, 0.7, 0.4)]

    kept = kept_models(study)
    assert sorted(kept) == later[:3]  # 3 kept, not 2: the unstored best displaced nothing
    assert sorted(p.name for p in store.iterdir()) == sorted(a for a, _ in kept.values())
    assert best not in kept
    [line] = [r.getMessage() for r in caplog.records if "not kept" in r.getMessage()]
    assert line.startswith(f"model of trial {best} not kept: could not store the model in ")
    assert "\n" not in line
    # Recorded for the study's readers (the trial is told: its own attributes are final).
    assert list(models_not_kept(study)) == [best]
    report = study_report(study)
    assert [row["trial"] for row in report["models_not_kept"]] == [best]
    text = " ".join(report_text(report).split())  # long lines wrap at the terminal's width
    assert f"model of trial {best} not kept: could not store the model in {store}" in text
    assert "kept models: trials 3, 2, 1" in text

    # The store breaks again: a later best model is not stored, and the kept ones stay.
    shutil.rmtree(store)
    store.write_text("not a directory")
    again = _finish(keeper, 0.95)
    assert again in models_not_kept(study) and again not in kept_models(study)
    assert sorted(kept_models(study)) == later[:3]
