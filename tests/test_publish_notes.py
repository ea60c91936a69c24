"""``search report --publish`` brings every trial's dashboard note up to date: a study run
without optuna-dashboard (no notes at all) gets them, a second publish writes none, and a note a
person edited in the dashboard is left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from search.observe.publish import publish_trial_notes
from search.record import attrs

ROOT = Path(__file__).resolve().parent.parent


def _study(url: str) -> optuna.Study:
    """Three finished trials and no notes: what a worker without optuna-dashboard leaves."""
    study = optuna.create_study(study_name="quiet", storage=url, direction="maximize")
    for i, state in enumerate(("complete", "complete", "pruned")):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)})
        trial.set_user_attr(attrs.MODEL, "ko-simcse")
        trial.set_user_attr(attrs.OUTCOME, state)
        if state == "pruned":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, 0.5 + 0.1 * i)
    return study


def _notes(study: optuna.Study) -> dict[int, dict[str, object]]:
    note = pytest.importorskip("optuna_dashboard._note")
    system = study._storage.get_study_system_attrs(study._study_id)
    return {
        t.number: note.get_note_from_system_attrs(system, t._trial_id) for t in study.get_trials()
    }


def test_publish_writes_missing_notes_once_and_keeps_edited_ones(tmp_path: Path) -> None:
    from optuna_dashboard import save_note

    url = f"sqlite:///{tmp_path / 'quiet.db'}"
    study = _study(url)
    assert all(n["version"] == 0 for n in _notes(study).values())
    done = subprocess.run(
        [sys.executable, "-m", "search.cli", "report", "--study", "quiet", "--storage", url,
         "--publish"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "3 trial notes" in done.stderr, done.stderr
    notes = _notes(study)
    assert all(n["version"] == 1 and n["body"] for n in notes.values()), notes
    assert "ko-simcse" in str(notes[0]["body"])
    # Up to date: nothing written again. A person's edit (version 2) stays.
    assert publish_trial_notes(study) == 0
    trial = study.trials[1]
    save_note(optuna.Trial(study, trial._trial_id), "looked at this one")
    assert publish_trial_notes(study) == 0
    assert _notes(study)[1] == {"version": 2, "body": "looked at this one"}
