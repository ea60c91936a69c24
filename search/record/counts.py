"""Counts over a study's trials: which spend the budget, which are preflight skips, which were
re-queued, and the name of the budget lock.

Pure functions over ``FrozenTrial`` lists (no storage access), shared by the budget
(``search.worker.budget``), the sampler, the stages, ``search refine`` and the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search.record import attrs

if TYPE_CHECKING:
    import optuna

__all__ = [
    "SPENT_STATES",
    "budget_lock_name",
    "is_skip",
    "requeued_numbers",
    "skip_count",
    "spent_count",
]

SPENT_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def budget_lock_name(study: optuna.Study) -> str:
    """The name of the study's budget lock (``storage.named_lock``), shared by every worker."""
    return f"budget:{study.study_name}"


def requeued_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of trials whose re-run was queued (they appear in some trial's retry history)."""
    return {n for t in trials for n in t.system_attrs.get(attrs.RETRY_HISTORY, ())}


def is_skip(trial: FrozenTrial) -> bool:
    """A preflight skip: PRUNED without training, ``oom_kind`` ``predicted`` or ``frontier``."""
    return (
        trial.state == TrialState.PRUNED
        and trial.user_attrs.get(attrs.OOM_KIND) in attrs.SKIP_KINDS
    )


def skip_count(trials: Sequence[FrozenTrial]) -> int:
    """Preflight skips (:func:`is_skip`): recorded trials that do not spend the budget."""
    return sum(is_skip(t) for t in trials)


def spent_count(trials: Sequence[FrozenTrial]) -> int:
    """Trials that spend the budget: COMPLETE, PRUNED (not skips), RUNNING, FAIL not re-queued."""
    requeued = requeued_numbers(trials)
    return sum(
        (t.state in SPENT_STATES and not is_skip(t))
        or (t.state == TrialState.FAIL and t.number not in requeued)
        for t in trials
    )
