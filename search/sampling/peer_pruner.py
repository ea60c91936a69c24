"""A median pruner that compares like with like and knows its noise (``pruner.type:
peer_median``).

Optuna's ``MedianPruner`` holds every trial to the median of all completed trials at the same
step, after a fixed number of warm-up steps. In this study that prunes the wrong trials: a big
model learns slower than the small ones, so its early reports sit below their median and it
is pruned before it has caught up; a sample evaluation of 200 queries has a standard error of
a few points of nDCG, so a trial "behind" by less than that is behind by chance; and a fixed
warm-up of N examples is most of a 5k-pair study and nothing of a 500k-pair one.

:class:`PeerMedianPruner` prunes a trial at step ``s`` (training examples seen) only when all
of these hold:

(a) ``s`` is past its warm-up: ``warmup_share`` of its own total training (the
    ``examples_total`` its reports carry), ``n_warmup_steps`` when the total is unknown;
(b) at least ``n_startup_trials`` completed *peers* reported a value at ``s``: trials of the
    same model (``peers="model"``), of the same stage (``"stage"``) or any (``"study"``);
(c) its value at ``s`` is behind the peers' median at ``s`` by more than ``noise_z`` x the
    standard error of its report (the metric's SE over the evaluated queries; 0 when the
    objective reports none: plain median behaviour). Direction-aware. The SE is the trial's
    own: all trials score the same queries, so a difference between two of them is less
    noisy than their SEs added, and one SE is the middle ground ``noise_z`` scales.

A NaN value past the warm-up is pruned (as Optuna's percentile pruner does). Like Optuna's
median pruner it reads completed trials only, at the same step; unlike it, it compares the
value at ``s``, not the trial's best so far: a sample evaluation scores higher than the full
one (fewer distractors), so a best-so-far would mix the two; the noise allowance does the
smoothing instead.

Cost: one read of the completed trials per call (Optuna's pruners read as much), grouped by
peer key again only when a trial completed since the last call; the trial's own record
(``search:pruning``, a system attribute: one storage read) is read only when it is behind the
median, the one case that needs its total and its SE.

The record is written by the worker's report hooks (``search.worker.step``), one write per
report: :func:`pruning_record` folds a report into it.

Example:
    >>> from optuna.trial import create_trial
    >>> study = optuna.create_study(direction="maximize")
    >>> study.add_trial(create_trial(value=0.5, intermediate_values={10: 0.5}))
    >>> pruner = PeerMedianPruner(peers="study", n_startup_trials=1, warmup_share=0.0)
    >>> def running(value, se):  # a trial that reported ``value`` at step 10, with its SE
    ...     return create_trial(state=TrialState.RUNNING, intermediate_values={10: value},
    ...                         system_attrs={SYSTEM_PRUNING: {"se": {"10": se}}})
    >>> pruner.prune(study, running(0.45, 0.1)), pruner.prune(study, running(0.45, 0.01))
    (False, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any
from typing import Literal

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search.record.attrs import MODEL
from search.record.attrs import REPORT_EXAMPLES_TOTAL
from search.record.attrs import STAGE
from search.record.attrs import SYSTEM_PRUNING
from search.record.attrs import se_key

__all__ = ["PeerMedianPruner", "Peers", "SYSTEM_PRUNING", "pruning_record", "read_record"]

Peers = Literal["model", "stage", "study"]
_COMPLETE = (TrialState.COMPLETE,)
_MODEL_PARAM = "model"  # the param every trial samples first (search.sampling.space)
_SE = "se"  # the record's map of step (a string, as JSON keys are) -> SE of the metric


def pruning_record(
    record: Mapping[str, Any] | None, step: int, metrics: Mapping[str, float], metric: str
) -> dict[str, Any] | None:
    """``record`` with one report folded in, or None when the report changes nothing.

    Args:
        record: The trial's record so far (``{"examples_total": int, "se": {"<step>": se}}``).
        step: The report's step (training examples seen).
        metrics: The report: ``examples_total`` and ``<metric>_se`` are read when present.
        metric: The study's metric (``ndcg@10``).

    Example:
        >>> report = {"ndcg@10": 0.4, "ndcg@10_se": 0.02, "examples_total": 1e5}
        >>> first = pruning_record(None, 5000, report, "ndcg@10")
        >>> first
        {'examples_total': 100000, 'se': {'5000': 0.02}}
        >>> pruning_record(first, 5000, {"ndcg@10_se": 0.02}, "ndcg@10") is None  # nothing new
        True
    """
    new = dict(record or {})
    se_map = dict(new.get(_SE) or {})
    changed = False
    total = metrics.get(REPORT_EXAMPLES_TOTAL)
    if total is not None and math.isfinite(total) and total > 0:
        changed |= new.get(REPORT_EXAMPLES_TOTAL) != int(total)
        new[REPORT_EXAMPLES_TOTAL] = int(total)
    se = metrics.get(se_key(metric))
    if se is not None and math.isfinite(se) and se >= 0:
        changed |= se_map.get(str(step)) != float(se)
        se_map[str(step)] = float(se)
    new[_SE] = se_map
    return new if changed else None


def read_record(trial: FrozenTrial) -> tuple[int | None, dict[str, float]]:
    """The trial's reported total (None: unknown) and the SE of its metric by step."""
    record = trial.system_attrs.get(SYSTEM_PRUNING)
    if not isinstance(record, Mapping):
        return None, {}
    total = record.get(REPORT_EXAMPLES_TOTAL)
    se = record.get(_SE)
    return (
        int(total) if isinstance(total, (int, float)) and total > 0 else None,
        dict(se) if isinstance(se, Mapping) else {},
    )


def _peer_key(trial: FrozenTrial, peers: Peers) -> object:
    """What a trial's peers share with it: its model, its stage, or nothing (the study)."""
    if peers == "model":  # the sampled param; the record's attribute on older trials
        model = trial.params.get(_MODEL_PARAM)
        return model if model is not None else trial.user_attrs.get(MODEL)
    if peers == "stage":
        return trial.user_attrs.get(STAGE)  # None: a single-stage study, all peers
    return None


class PeerMedianPruner(optuna.pruners.BasePruner):
    """Prune a trial behind its peers' median by more than its evaluation's noise, past a
    warm-up that is a share of its own training (see the module docstring).

    Args:
        peers: Who a trial is compared with: ``model``, ``stage`` or ``study``.
        n_startup_trials: Completed peers with a value at the step needed to prune (at least 1).
        warmup_share: No pruning before this share of the trial's total training, in [0, 1).
        n_warmup_steps: The warm-up, in examples, of a trial that reported no total.
        noise_z: How many of its report's standard errors a trial may be behind the median.
    """

    def __init__(
        self,
        *,
        peers: Peers = "model",
        n_startup_trials: int = 3,
        warmup_share: float = 0.4,
        n_warmup_steps: int = 0,
        noise_z: float = 1.0,
    ) -> None:
        if peers not in ("model", "stage", "study"):
            raise ValueError(f"peers must be model, stage or study, but got {peers!r}.")
        if n_startup_trials < 0 or n_warmup_steps < 0:
            raise ValueError(
                f"n_startup_trials and n_warmup_steps must be >= 0, but got "
                f"{n_startup_trials=}, {n_warmup_steps=}."
            )
        if not 0.0 <= warmup_share < 1.0:
            raise ValueError(f"warmup_share must be in [0, 1), but got {warmup_share=}.")
        if not (noise_z >= 0.0 and math.isfinite(noise_z)):
            raise ValueError(f"noise_z must be a finite number >= 0, but got {noise_z=}.")
        self.peers: Peers = peers
        self.n_startup_trials = n_startup_trials
        self.warmup_share = warmup_share
        self.n_warmup_steps = n_warmup_steps
        self.noise_z = noise_z
        # The completed trials by peer key, as of (study name, number of completed trials).
        self._groups: tuple[tuple[str, int], dict[object, list[FrozenTrial]]] = (("", -1), {})

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        """True when ``trial``'s last report is past its warm-up and behind its peers'
        median at that step by more than ``noise_z`` standard errors."""
        step = trial.last_step
        if step is None:
            return False
        value = trial.intermediate_values[step]
        if math.isnan(value):
            return self._past_warmup(step, read_record(trial)[0])
        values = []
        for peer in self._peers_of(study, _peer_key(trial, self.peers)):
            at = peer.intermediate_values.get(step)
            if at is not None and at == at:  # not NaN
                values.append(at)
        if len(values) < max(self.n_startup_trials, 1):
            return False
        values.sort()
        mid = len(values) // 2
        median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
        behind = median - value if study.direction == StudyDirection.MAXIMIZE else value - median
        if behind <= 0:
            return False
        total, se_by_step = read_record(trial)  # a storage read: only for a trial behind
        if not self._past_warmup(step, total):
            return False
        se = se_by_step.get(str(step), 0.0)
        return behind > self.noise_z * (se if isinstance(se, (int, float)) else 0.0)

    def _peers_of(self, study: optuna.Study, key: object) -> list[FrozenTrial]:
        """The completed trials that share ``key``, grouped again only when a trial completed
        since the last call (a completed trial never changes)."""
        completed = study.get_trials(deepcopy=False, states=_COMPLETE)
        stamp = (study.study_name, len(completed))
        if self._groups[0] != stamp:
            self._groups = (stamp, {})
        groups = self._groups[1]
        group = groups.get(key)
        if group is None:
            peers = self.peers
            group = [t for t in completed if peers == "study" or _peer_key(t, peers) == key]
            groups[key] = group
        return group

    def _past_warmup(self, step: int, total: int | None) -> bool:
        """The warm-up is ``warmup_share`` of the total, else ``n_warmup_steps`` examples."""
        warmup = self.warmup_share * total if total is not None else self.n_warmup_steps
        return step >= warmup
