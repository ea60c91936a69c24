"""One trial end to end: claim, sample, preflight, train, record, tell (``Worker.step``).

1. claim a trial under the study's global budget (``search.worker.budget.claim``): the one
   read of the trial list in the step, fresh, under the lock; the snapshot it read is handed
   to the stage plan, the sampler (random-startup count, feasible grid), the preflight and
   the progress count instead of reading the list again;
2. sample the conditional space into an effective ``TrialConfig``;
3. preflight once: skip a config whose memory estimate does not fit, or that an earlier real
   OOM dominates (``oom: predicted`` / ``oom: frontier``), without loading the model; the
   feasible grid's decision for the same shape is reused, not estimated again;
4. train (``Worker.trainer``: a child process by default), reporting each evaluation to the
   pruner, under heartbeats so that a dead worker's trial is re-queued;
5. tell Optuna the outcome: COMPLETE, PRUNED (early stop or any OOM) or FAIL.

Observers hear of each stage through events (``search.worker.events``), queued for the
worker's event thread and never waited for here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any
from typing import Protocol

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search.memory.device import DeviceInfo
from search.memory.feasible import PREFLIGHT_STATES
from search.memory.feasible import Decisions
from search.memory.feasible import FeasibleGrid
from search.memory.feasible import grid_decision
from search.memory.preflight import PreflightDecision
from search.memory.preflight import preflight
from search.record import attrs
from search.record.config import TrialConfig
from search.record.counts import budget_lock_name
from search.record.counts import is_skip
from search.record.counts import spent_count
from search.record.models import ModelInfo
from search.record.precision import precision_name
from search.record.trial_record import TrialRecord
from search.record.trial_record import lost_attrs
from search.record.trial_record import write_record
from search.sampling.peer_pruner import pruning_record
from search.sampling.sampler import ConditionalSampler
from search.sampling.space import build_config
from search.sampling.space import sample_params
from search.spec.options import RunOptions
from search.spec.study_spec import StudySpec
from search.worker.budget import BeforeAsk
from search.worker.budget import Claim
from search.worker.budget import SkipBoundError
from search.worker.budget import StaleTrial
from search.worker.budget import claim
from search.worker.budget import fail_and_requeue
from search.worker.budget import hand_back
from search.worker.dispatch import EventDispatcher
from search.worker.events import Claimed
from search.worker.events import Dropped
from search.worker.events import HandedBack
from search.worker.events import Reported
from search.worker.events import Skipped
from search.worker.events import StepLogged
from search.worker.events import Told
from search.worker.isolation import TrialOutcome
from search.worker.records import claimed_record
from search.worker.records import outcome_record
from search.worker.records import skip_record
from search.worker.records import trial_timings
from search.worker.trainer import Trainer
from search.worker.trainer import TrainHooks
from storage import compat
from storage import heartbeat
from storage import named_lock

__all__ = ["StepResult", "StepWorker", "finished_of", "run_step"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """What one step did.

    Args:
        number: The trial claimed (None: nothing was claimed).
        outcome: ``complete``, ``pruned``, ``oom``, ``failed``, ``skipped`` (preflight),
            ``handed_back``, ``dropped`` (failed as stale elsewhere) or ``none``.
        frozen: The trial as this worker told it (None: not told here).
        stopped: Nothing was claimed (budget spent, or ``stop()``) or the trial was handed
            back: the loop ends.
        handed_back: ``stop()`` during the trial: it was handed back and re-queued.
        budget: The study's budget.
        finished: Finished trials that spent the budget, as of this step's claim plus its own.
        trained: What the trainer returned (None: skipped, handed back or nothing claimed).
    """

    number: int | None
    outcome: str
    frozen: FrozenTrial | None
    stopped: bool
    handed_back: bool
    budget: int
    finished: int
    trained: TrialOutcome | None = None


class StepWorker(Protocol):
    """What a step needs of its worker (``search.worker.worker.Worker``)."""

    spec: StudySpec
    opts: RunOptions
    study: optuna.Study
    storage: optuna.storages.BaseStorage
    budget: int
    device: DeviceInfo
    model_paths: dict[str, str]
    trainer: Trainer
    events: EventDispatcher

    @property
    def stage_plan(self) -> BeforeAsk | None: ...

    def arch_of(self, model: str) -> ModelInfo: ...

    def grid_choices(self) -> dict[str, dict[str, list[int]]] | None: ...

    def feasible_grid(
        self, trials: list[FrozenTrial], decisions: Decisions
    ) -> FeasibleGrid | None: ...

    def on_requeued(self, stale: list[StaleTrial]) -> None: ...


def finished_of(trials: list[FrozenTrial]) -> int:
    """Finished trials that spent the budget (``spent_count`` less the RUNNING ones)."""
    return spent_count(trials) - sum(t.state == TrialState.RUNNING for t in trials)


class _Interrupted(Exception):
    """SIGTERM or SIGINT arrived while this worker ran a trial: hand it back and stop."""


def run_step(
    worker: StepWorker, stop: Callable[[], bool] = lambda: False, *, wait: bool = True
) -> StepResult:
    """Run one trial of ``worker``'s study end to end (see the module docstring).

    Args:
        worker: The worker (``Worker.open``).
        stop: True once the worker should stop (SIGTERM / SIGINT): no claim is made, and a
            running trial is stopped and handed back.
        wait: When the budget is spent while other workers' trials run, wait for them (one
            could be re-queued here); False returns at once (in-memory studies, benches).

    Raises:
        SkipBoundError: The study skipped ``max_skips_per_trial`` x budget configs for
            memory before spending its budget (one line, naming the device).
    """
    spec, study = worker.spec, worker.study
    max_skips = spec.study.max_skips_per_trial * worker.budget  # skips are free, up to this
    try:
        taken = claim(
            study,
            worker.budget,
            wait=wait,
            stop=stop,
            max_skips=max_skips,
            before_ask=worker.stage_plan,
            on_requeued=worker.on_requeued,
        )
    except SkipBoundError as exc:  # one line, naming the device
        raise SkipBoundError(f"{exc} (device: {worker.device.label})") from None
    if taken is None:
        budget, finished = worker.budget, -1
        return StepResult(None, "none", None, True, False, budget, finished)
    trial, before = taken.trial, finished_of(taken.trials)
    try:
        frozen, trained = _run_trial(worker, taken, stop)
    except UpdateFinishedTrialError:
        # Failed as stale (this worker was paused or cut off longer than the grace period)
        # and re-queued by a survivor: its re-run owns the result.
        _logger.warning(
            "trial %d was failed as stale and re-queued elsewhere; dropping its result",
            trial.number,
        )
        worker.events.emit(Dropped(study, trial.number, compat.trial_id(trial)))
        return StepResult(trial.number, "dropped", None, False, False, worker.budget, before)
    except _Interrupted:
        handed = hand_back(study, trial)
        if handed:
            worker.events.emit(HandedBack(study, trial.number, compat.trial_id(trial)))
        return StepResult(trial.number, "handed_back", None, True, handed, worker.budget, before)
    except BaseException as exc:
        _end_on_error(worker, trial, exc)
        raise
    outcome = "skipped" if is_skip(frozen) else str(frozen.user_attrs.get(attrs.OUTCOME, "?"))
    finished = before + (0 if is_skip(frozen) else 1)
    return StepResult(
        frozen.number, outcome, frozen, False, False, worker.budget, finished, trained
    )


def _end_on_error(worker: StepWorker, trial: optuna.trial.Trial, exc: BaseException) -> None:
    """The worker itself failed during the trial: end the trial now, with its outcome.

    An interruption (``KeyboardInterrupt``, ``SystemExit``: a caller without the runner's
    signal flag) hands it back; any other error fails it as ``failed`` with the error's line
    and re-queues it (as a stale trial would be, up to the storage's ``max_retry``), so it is
    neither left RUNNING until its heartbeat goes stale nor recorded as ``running``. Best
    effort: when the database is what failed, the stale sweep does it later.
    """
    study = worker.study
    try:
        if not isinstance(exc, Exception):
            if hand_back(study, trial):
                worker.events.emit(HandedBack(study, trial.number, compat.trial_id(trial)))
            return
        line = " ".join(f"{type(exc).__name__}: {exc}".split())
        storage = compat.study_storage(study)
        with named_lock(storage, budget_lock_name(study)):
            failed = fail_and_requeue(
                study,
                compat.trial_id(trial),
                user_attrs=lost_attrs(f"worker error: {line}"),
                max_retry=compat.stale_retry_limit(storage),
            )
        if failed is not None:
            _logger.warning("trial %d failed by a worker error and re-queued", trial.number)
            worker.events.emit(Dropped(study, trial.number, compat.trial_id(trial)))
    except Exception as error:  # noqa: BLE001 - the worker's own error is the one raised
        _logger.debug("trial %d not ended here: %s", trial.number, error)


# ------------------------------------------------------------------ one claimed trial


class _Snapshot:
    """The trials the claim read, and the feasible grid of them (computed once, if asked)."""

    def __init__(self, worker: StepWorker, trials: list[FrozenTrial]) -> None:
        self.trials = trials
        self.decisions: Decisions = {}
        self._worker = worker
        self._grid: FeasibleGrid | None = None
        self._asked = False

    def grid(self) -> FeasibleGrid:
        if not self._asked:
            self._asked = True
            self._grid = self._worker.feasible_grid(self.trials, self.decisions)
        return self._grid or {}

    def decide(self, cfg: TrialConfig, worker: StepWorker) -> PreflightDecision:
        """The preflight of ``cfg``: the grid's decision when it asked about the same shape,
        else the preflight on these trials (never both)."""
        decision = grid_decision(self.decisions, cfg)
        if decision is not None:
            return decision
        return preflight(
            cfg,
            worker.arch_of(cfg.model),
            worker.device,
            [t for t in self.trials if t.state in PREFLIGHT_STATES],
            use_estimate=worker.opts.use_estimate,
            use_frontier=worker.opts.use_frontier,
        )


def _sampling(worker: StepWorker, trial: optuna.trial.Trial, snap: _Snapshot) -> Any:
    """While sampling, the sampler reads the snapshot (``ConditionalSampler.pinned``)."""
    sampler = worker.study.sampler
    if not isinstance(sampler, ConditionalSampler):
        return nullcontext()  # another sampler (a bench's) reads the study itself
    grid = snap.grid if worker.grid_choices() is not None else None
    return sampler.pinned(compat.trial_id(trial), snap.trials, grid)


def _run_trial(
    worker: StepWorker, taken: Claim, stop: Callable[[], bool]
) -> tuple[FrozenTrial, TrialOutcome | None]:
    """Sample, preflight, train and tell one claimed trial.

    Raises:
        _Interrupted: ``stop()`` became true before the trial finished (its child is gone).
        UpdateFinishedTrialError: The trial was failed as stale meanwhile (child stopped).
    """
    started = time.monotonic()
    spec, opts, study, events = worker.spec, worker.opts, worker.study, worker.events
    trial = taken.trial
    tid = compat.trial_id(trial)
    snap = _Snapshot(worker, taken.trials)
    with _sampling(worker, trial, snap):
        params = sample_params(trial, spec)
    cfg = build_config(
        spec,
        params,
        model_path=worker.model_paths.get(params.model),
        device=opts.device,
        seed_offset=trial.number,
    )
    if spec.training.eval_every_steps is not None:  # prune sooner (search.train.partial_eval)
        cfg = dataclasses.replace(
            cfg,
            eval_every_steps=spec.training.eval_every_steps,
            eval_sample_queries=spec.training.eval_sample_queries,
        )
    arch = worker.arch_of(cfg.model)

    with heartbeat(study, trial):
        decision = snap.decide(cfg, worker)
        cfg = decision.config or cfg  # gradient_cache: auto resolved from the estimate
        claimed = Claimed(
            study, trial.number, tid, cfg, dict(trial.params), decision.estimate.total_mb
        )
        first = claimed_record(
            cfg,
            worker.device,
            host=socket.gethostname(),
            gpu=opts.gpu if opts.gpu is not None else os.environ.get("CUDA_VISIBLE_DEVICES"),
            worker=opts.worker,
            memory_estimate_mb=decision.estimate.total_mb,
            model_facts=arch.source,
            # The child's rule on the same machine: the device `auto` resolved to, its hidden.
            precision=precision_name(worker.device.kind, cfg.amp, hidden=arch.hidden),
        )
        first.user.update(events.trial_attrs(claimed))  # e.g. the W&B run's id
        if decision.skip:
            first.update(skip_record(decision, time.monotonic() - started))
            write_record(worker.storage, tid, first)
            skipped = study.tell(trial, state=TrialState.PRUNED)
            events.emit(claimed)
            events.emit(Skipped(study, trial.number, tid, skipped, decision.reason))
            return skipped, None
        # Before training: the dashboard shows it running, with its config.
        write_record(worker.storage, tid, first)
        events.emit(claimed)
        if stop():
            raise _Interrupted()
        trains_at = time.monotonic()
        outcome = worker.trainer(events.training_config(claimed, cfg), _hooks(worker, trial, stop))
        returned_at = time.monotonic()
    # A child killed or failed by the same signal (Ctrl-C reaches the whole process group)
    # is an interruption too, not the trial's failure.
    if outcome.status == "stopped" or (stop() and outcome.status in ("killed", "failed")):
        raise _Interrupted()
    now = time.monotonic()
    # The worker's own phases around the child's: before it (sample, preflight, the claimed
    # record) and after the objective ended (its final message, the heartbeat's end) up to now.
    timings = trial_timings(
        outcome, prepare=trains_at - started, record=now - (outcome.ended_at or returned_at)
    )
    frozen = _tell(worker, trial, outcome, now - started, timings)
    events.emit(Told(study, trial.number, tid, frozen, outcome, cfg))
    return frozen, outcome


def _hooks(worker: StepWorker, trial: optuna.trial.Trial, stop: Callable[[], bool]) -> TrainHooks:
    """The trainer's reports go to the pruner (and, as events, to the observers).

    Each report's noise and the run's total (``ndcg@10_se``, ``examples_total``) are kept in
    the trial's ``search:pruning`` system attribute for the pruner (``peer_pruner``): one
    write per report that brings either, none otherwise.
    """
    study, events, metric = worker.study, worker.events, worker.spec.study.metric
    tid = compat.trial_id(trial)
    record: dict[str, Any] | None = None

    def tell_pruner(step: int, metrics: dict[str, float]) -> bool:
        nonlocal record
        trial.report(metrics[metric], step)
        folded = pruning_record(record, step, metrics, metric)
        if folded is not None:
            record = folded
            write_record(worker.storage, tid, TrialRecord(system={attrs.SYSTEM_PRUNING: record}))
        return trial.should_prune()

    def report(epoch: int, metrics: dict[str, float]) -> bool:
        events.emit(Reported(study, trial.number, epoch, dict(metrics)))
        # One step axis for all trials: training examples seen (search.train.partial_eval);
        # an objective that does not say (a fake one) reports on its epochs.
        return tell_pruner(int(metrics.get("examples_seen", epoch)), metrics)

    def report_partial(examples_seen: int, metrics: dict[str, float]) -> bool:
        events.emit(Reported(study, trial.number, examples_seen, dict(metrics), partial=True))
        return tell_pruner(examples_seen, metrics)  # the eval sample's score

    def on_step(step: int, values: dict[str, float]) -> None:
        events.emit(StepLogged(study, trial.number, step, dict(values)))

    return TrainHooks(report, report_partial, on_step if events.wants("step") else None, stop)


def _tell(
    worker: StepWorker,
    trial: optuna.trial.Trial,
    outcome: TrialOutcome,
    seconds: float,
    timings: dict[str, float] | None = None,
) -> FrozenTrial:
    """Record the trained trial's outcome (and where its time went) and finish it.

    The outcome's write and ``study.tell`` come after ``seconds`` and ``timings`` were read,
    so neither counts them (a finished trial's attributes cannot be set any more).
    """
    metric = worker.spec.study.metric
    record = outcome_record(outcome, metric, seconds, timings)
    write_record(worker.storage, compat.trial_id(trial), record)
    told = record.user[attrs.OUTCOME]
    if told == attrs.OUTCOME_COMPLETE:
        return worker.study.tell(trial, outcome.metrics[metric])
    if told in (attrs.OUTCOME_PRUNED, attrs.OUTCOME_OOM):
        # An OOM is an answer about memory, not a broken trial: PRUNED keeps it in what TPE
        # learns from (FAIL would hide it), and the frontier reads it back (README).
        return worker.study.tell(trial, state=TrialState.PRUNED)
    return worker.study.tell(trial, state=TrialState.FAIL)
