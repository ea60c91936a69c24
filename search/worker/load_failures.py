"""Stop searching a model whose trials keep failing to load it (one worker, for its run).

Weights that do not match their ``config.json``, a truncated ``model.safetensors``, a
tokenizer missing: every trial of that model fails the same way at load
(``search.train.encoder.ModelLoadError``) and would spend the budget for nothing. When
``LOAD_FAILURES_IN_A_ROW`` trials of one model in a row fail with the same load error, the
worker stops sampling it for the rest of its run (``ConditionalSampler.exclude``) and says so in
one line; when no searched model is left, the run stops with one line (``RunError``, exit 1).
A trial of the model that loaded (whatever became of it after) starts the count again; a
preflight skip, which loads nothing, leaves it. The count is the worker's own, from the trials
it ran: a later run (the weights fixed) samples the model again.
"""

from __future__ import annotations

import logging

from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search.record.counts import is_skip
from search.record.errors import RunError
from search.record.trial_record import error_of
from search.record.trial_record import model_of

__all__ = ["LOAD_FAILURES_IN_A_ROW", "LoadFailures", "is_load_error"]

_logger = logging.getLogger(__name__)
LOAD_FAILURES_IN_A_ROW = 2
_PREFIX = "ModelLoadError: "


def is_load_error(trial: FrozenTrial) -> bool:
    """Whether ``trial`` failed because its model could not be loaded."""
    return trial.state == TrialState.FAIL and error_of(trial).startswith(_PREFIX)


class LoadFailures:
    """Each model's run of trials that failed the same load error, and the models given up.

    Args:
        models: The models the worker searches.
        spec: Where they are declared (the spec file), for the last line.
        limit: Failures in a row, with the same error, that give a model up.
    """

    def __init__(
        self, models: list[str], spec: str = "the spec", limit: int = LOAD_FAILURES_IN_A_ROW
    ) -> None:
        self.models = list(models)
        self.spec = spec
        self.limit = limit
        self.excluded: dict[str, str] = {}  # model -> its load error
        self._runs: dict[str, tuple[str, int]] = {}  # model -> (error, failures in a row)

    def note(self, trial: FrozenTrial) -> str | None:
        """Count a trial this worker told; the model to give up now, else None.

        Raises:
            RunError: The model given up now was the last one searched.
        """
        if is_skip(trial):
            return None  # nothing was loaded
        model = model_of(trial)
        if not is_load_error(trial):
            self._runs.pop(model, None)
            return None
        error = error_of(trial).removeprefix(_PREFIX)
        last, count = self._runs.get(model, ("", 0))
        count = count + 1 if error == last else 1
        self._runs[model] = (error, count)
        if count < self.limit or model in self.excluded:
            return None
        self.excluded[model] = error
        left = [m for m in self.models if m not in self.excluded]
        if not left:
            raise RunError(
                f"no model left to search: the last {count} trials of {model!r} failed to load "
                f"it: {error} (or drop {model} from {self.spec})"
            )
        _logger.warning(
            "model %r is not searched for the rest of this run: its last %d trials failed to "
            "load it: %s",
            model,
            count,
            error,
        )
        return model
