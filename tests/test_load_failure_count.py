"""The count behind giving a model up (``search.worker.load_failures``): in a row, same error."""

from __future__ import annotations

import pytest
from optuna.trial import FrozenTrial
from optuna.trial import TrialState
from optuna.trial import create_trial

from search.record import attrs
from search.record.errors import RunError
from search.worker.load_failures import LoadFailures

BROKEN = "ModelLoadError: Cannot load model 'a' from '/w': its weights do not match"


def _trial(model: str, state: TrialState, error: str | None = None, **extra: str) -> FrozenTrial:
    user = {attrs.MODEL: model, **extra}
    if error is not None:
        user[attrs.ERROR] = error
    value = 0.5 if state == TrialState.COMPLETE else None
    return create_trial(state=state, value=value, user_attrs=user)


def test_two_same_load_errors_in_a_row_give_a_model_up() -> None:
    count = LoadFailures(["a", "b"], "spec.yaml")
    assert count.note(_trial("a", TrialState.FAIL, BROKEN)) is None
    # A trial of a that loaded (it then failed otherwise) starts the count again.
    assert count.note(_trial("a", TrialState.FAIL, "ValueError: later")) is None
    assert count.note(_trial("a", TrialState.FAIL, BROKEN)) is None
    # Another model's trials and a preflight skip (nothing loaded) leave it as it is.
    assert count.note(_trial("b", TrialState.COMPLETE)) is None
    skip = _trial("a", TrialState.PRUNED, **{attrs.OOM_KIND: "predicted"})
    assert count.note(skip) is None
    # A different load error is a new run of one.
    assert count.note(_trial("a", TrialState.FAIL, BROKEN + " (other)")) is None
    assert count.note(_trial("a", TrialState.FAIL, BROKEN + " (other)")) == "a"
    assert list(count.excluded) == ["a"]
    assert count.note(_trial("a", TrialState.FAIL, BROKEN + " (other)")) is None  # once
    count.note(_trial("b", TrialState.FAIL, BROKEN.replace("'a'", "'b'")))
    with pytest.raises(RunError, match=r"^no model left to search: the last 2 trials of 'b'"):
        count.note(_trial("b", TrialState.FAIL, BROKEN.replace("'a'", "'b'")))
