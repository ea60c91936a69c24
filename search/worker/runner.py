"""The study runner: claim a trial, sample it, check memory, train it isolated, record it.

``search run`` and ``search worker`` both call :func:`run_study`; a run is one worker that
happens to be alone. The loop, top to bottom:

1. claim a trial under the study's global budget (``search.worker.budget.claim_trial``);
2. sample the conditional space into an effective ``TrialConfig``;
3. preflight: skip a config whose memory estimate does not fit, or that an earlier real OOM
   dominates (``oom: predicted`` / ``oom: frontier``), without loading the model;
4. train in a child process (``search.worker.isolation.run_isolated``), reporting each epoch's
   metric to the pruner, under heartbeats so that a dead worker's trial is re-queued;
5. tell Optuna the outcome: COMPLETE, PRUNED (early stop or any OOM) or FAIL.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from search.memory.device import DeviceInfo
from search.memory.device import device_info
from search.memory.feasible import PREFLIGHT_STATES
from search.memory.feasible import feasibility
from search.memory.preflight import preflight
from search.observe import publish
from search.observe.keep import keeper_for
from search.observe.tracking import NO_RUN
from search.observe.tracking import Tracker
from search.observe.tracking import tracking_settings
from search.record import attrs
from search.record.config import TrialConfig
from search.record.errors import RunError
from search.record.models import ModelInfo
from search.record.trial_record import TrialRecord
from search.record.trial_record import error_of
from search.record.trial_record import name_metric
from search.record.trial_record import write_record
from search.sampling.pruners import make_pruner
from search.sampling.sampler import ConditionalSampler
from search.sampling.sampler import make_sampler
from search.sampling.space import SampledParams
from search.sampling.space import build_config
from search.sampling.space import sample_params
from search.sampling.stages import StagePlan
from search.spec.model_facts import resolve_facts
from search.spec.model_resolve import recorded_models
from search.spec.model_resolve import searched_models
from search.spec.options import RunOptions
from search.spec.options import study_name_for
from search.spec.stage_check import stage_models
from search.spec.study_spec import StudySpec
from search.train.data import validate_data
from search.train.tiny import tiny_info
from search.worker.budget import SkipBoundError
from search.worker.budget import claim_trial
from search.worker.budget import ensure_budget
from search.worker.budget import finished_count
from search.worker.budget import hand_back
from search.worker.budget import watch_stale
from search.worker.isolation import TrialOutcome
from search.worker.isolation import run_isolated
from search.worker.isolation import warm_up
from search.worker.prepare import model_facts
from search.worker.prepare import prepare_models
from search.worker.records import claimed_record
from search.worker.records import outcome_record
from search.worker.records import skip_record
from search.worker.study_store import open_study
from storage import create_storage
from storage import heartbeat
from storage import redact_url

_logger = logging.getLogger(__name__)
_STOP_SIGNALS: dict[int, str] = {signal.SIGTERM: "sigterm", signal.SIGINT: "sigint"}


class _Interrupted(Exception):
    """SIGTERM or SIGINT arrived while this worker ran a trial: hand it back and stop."""


class _StopFlag:
    """Set by SIGTERM / SIGINT; the loop reads it at safe points.

    The handlers only set this flag and never raise, so a signal cannot cut into a database
    call, the budget lock or a hand-back (six SIGTERMs in a row hand the trial back once).
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def reason(self) -> str:
        return _STOP_SIGNALS.get(self.signum or 0, "signal")


@dataclass
class RunSummary:
    """What one call of :func:`run_study` did."""

    study_name: str
    storage_url: str
    trials_run: int
    stopped_by: str  # "budget" | "timeout" | "sigterm" | "sigint"
    study: optuna.Study
    handed_back: int | None = None  # the trial number handed back on SIGTERM / SIGINT


TrialCallback = Callable[[optuna.trial.FrozenTrial], None]


def _init_study(
    spec: StudySpec, opts: RunOptions, searched: list[str]
) -> Callable[[optuna.Study], None]:
    def init(study: optuna.Study) -> None:
        study.set_user_attr(attrs.STUDY_SPEC, spec.public_dict())
        ensure_budget(study, opts.n_trials or spec.study.n_trials)
        if list(searched) != list(spec.models):  # --skip-unavailable left some out
            study.set_user_attr(attrs.STUDY_MODELS, list(searched))
        # One baseline trial per model, so no model is left out of the first trials by chance.
        # In a staged search: the first stage's models, recorded in that stage.
        first = spec.stages[0] if spec.stages else None
        for model in [m for m in (stage_models(spec, first) if first else spec.models)
                      if m in searched]:  # fmt: skip
            stage = {attrs.STAGE: first.name} if first else None
            study.enqueue_trial({"model": model}, user_attrs=stage)

    return init


@contextmanager
def _stop_on_signals() -> Iterator[_StopFlag]:
    """SIGTERM and SIGINT set the returned flag while the block runs (main thread only).

    Once a signal has stopped the run, SIGTERM stays ignored after the block (SIGINT keeps the
    flag's handler): the caller is on its way out, and a repeated SIGTERM (``docker stop`` and
    supervisors send several) must not kill it with the default action between the hand-back
    and the exit. ``SIG_IGN``, not a Python handler, because the interpreter puts the default
    action back for Python handlers when it shuts down.
    """
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {signum: signal.signal(signum, flag.handler) for signum in _STOP_SIGNALS}
    try:
        yield flag
    finally:
        if not flag():
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run_study(
    spec: StudySpec,
    opts: RunOptions,
    *,
    on_trial: TrialCallback | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    check_data: bool = True,
) -> RunSummary:
    """Run trials of ``spec``'s study until its budget is spent, the timeout passes or a signal.

    Data are validated before anything is written to the study (``check_data=False``: the
    caller just did). ``on_progress`` gets the study's budget and its finished trials (all
    workers'), at the start and after each trial of this worker; ``on_trial`` each trial this
    worker finished. SIGTERM or SIGINT hands the running trial back (``handed_back``) and
    stops; a trial that was failed as stale and re-queued elsewhere while this worker was cut
    off is dropped, and the worker goes on.
    """
    if check_data:  # False when the caller (the CLI) has just checked the same files
        validate_data(
            spec.resolve_path(spec.data.train), spec.resolve_path(spec.data.eval), spec.data.split
        )
    if opts.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = opts.gpu
    # Connect (and check the schema) before anything slow: an unreachable server or a wrong
    # database name is answered before tiny replicas are built or weights resolved.
    storage = create_storage(opts.storage_url)
    name = study_name_for(spec, opts)
    # Exit 2 on a missing model, before the study is opened (the CLI checked it already).
    searched = searched_models(spec, opts, recorded_models(storage, name))
    model_paths = prepare_models(spec, opts, searched)
    facts = model_facts(spec, opts, model_paths)
    study, _ = open_study(
        storage,
        name,
        direction=spec.study.direction,
        sampler=make_sampler(spec, seed=opts.seed, models=searched),
        pruner=make_pruner(spec),
        on_create=_init_study(spec, opts, searched),
    )
    budget = ensure_budget(study, opts.n_trials, change=opts.set_n_trials)
    name_metric(study, spec.study.metric)  # dashboard plots say "ndcg@10" (old studies too)
    if on_progress is not None:
        on_progress(budget, finished_count(study))
    device = device_info(opts.device, memory_limit=opts.memory_limit)
    stage_plan = _stage_plan(study, spec, opts, budget, model_paths, device)
    _draw_what_fits(study, spec, opts, model_paths, device, facts)
    tracker = Tracker(tracking_settings(spec, opts), name)  # W&B: one run per trial, or none
    tracker.prepare()  # imports wandb on a thread while the trial process server starts
    warm_up(opts.objective)  # start the trial process server (imports torch once) up front
    deadline = time.monotonic() + opts.timeout if opts.timeout else None
    trials_run = 0
    stopped_by = "budget"
    handed_back = None
    with _stop_on_signals() as stop, watch_stale(study):
        while True:
            if stop():
                stopped_by = stop.reason
                break
            if deadline is not None and time.monotonic() >= deadline:
                stopped_by = "timeout"
                break
            # Skips (predicted / frontier OOM) do not spend the budget, up to a bound.
            max_skips = spec.study.max_skips_per_trial * budget
            try:
                trial = claim_trial(
                    study, budget, stop=stop, max_skips=max_skips, before_ask=stage_plan
                )
            except SkipBoundError as exc:  # one line, naming the device
                raise SkipBoundError(f"{exc} (device: {device.label})") from None
            if trial is None:
                stopped_by = stop.reason if stop() else stopped_by
                break
            try:
                frozen = _run_trial(
                    study, trial, spec, opts, model_paths, device, storage, stop, tracker, facts
                )
            except UpdateFinishedTrialError:
                # Failed as stale (this worker was paused or cut off longer than the grace
                # period) and re-queued by a survivor: its re-run owns the result.
                _logger.warning(
                    "trial %d was failed as stale and re-queued elsewhere; dropping its result",
                    trial.number,
                )
                frozen = None
                tracker.abandon(attrs.OUTCOME_FAILED, "failed as stale and re-queued elsewhere")
            except _Interrupted:
                tracker.abandon(attrs.OUTCOME_HANDED_BACK)
                if hand_back(study, trial):
                    handed_back = trial.number
                    publish.note_trial(study, trial._trial_id)  # "handed back ..., re-queued"
                stopped_by = stop.reason
                break
            if frozen is not None:
                trials_run += 1
                publish.after_trial(study, frozen)  # dashboard notes; never raises
                if on_trial is not None:
                    on_trial(frozen)
            if on_progress is not None:
                on_progress(budget, finished_count(study))
            if frozen is not None:
                _stop_on_load_error(frozen, spec)
    publish.finish(study)  # the study note as this worker leaves it; never raises
    if on_progress is not None:  # the other workers' last trials may have ended since
        on_progress(budget, finished_count(study))
    return RunSummary(
        name, redact_url(opts.storage_url), trials_run, stopped_by, study, handed_back
    )


def _stage_plan(
    study: optuna.Study,
    spec: StudySpec,
    opts: RunOptions,
    budget: int,
    model_paths: dict[str, str],
    device: DeviceInfo,
) -> StagePlan | None:
    """The claim hook of a staged search (``search.sampling.stages``); None for a single stage."""
    if not spec.stages:
        return None
    return StagePlan(
        spec,
        study.sampler,
        budget,
        config_for=_config_for(spec, opts, model_paths),
        device_total_bytes=device.total_bytes,
        seed=opts.seed,
    )


def _config_for(
    spec: StudySpec, opts: RunOptions, model_paths: dict[str, str]
) -> Callable[[str, int, int], TrialConfig]:
    """A model's config at a batch size and length, the other settings mid-range (for memory
    questions: learning rate and the like do not change the peak)."""
    space = spec.space

    def config_for(model: str, batch_size: int, max_len: int) -> TrialConfig:
        mid = {
            name: (rng.low * rng.high) ** 0.5 if rng.log else (rng.low + rng.high) / 2
            for name, rng in (("lr", space.lr), ("temperature", space.temperature),
                              ("warmup_ratio", space.warmup_ratio),
                              ("weight_decay", space.weight_decay))
        }  # fmt: skip
        params = SampledParams(model=model, batch_size=batch_size, max_len=max_len, **mid)
        return build_config(spec, params, model_path=model_paths.get(model), device=opts.device)

    return config_for


def _arch_of(
    spec: StudySpec, opts: RunOptions, facts: dict[str, ModelInfo], model: str
) -> ModelInfo:
    """The facts the preflight estimates ``model`` from: the worker's (``model_facts``), else
    resolved now (a tiny replica's when ``--tiny``)."""
    if model in facts:
        return facts[model]
    arch = resolve_facts(spec, model)
    return tiny_info(arch) if opts.tiny else arch


def _draw_what_fits(
    study: optuna.Study,
    spec: StudySpec,
    opts: RunOptions,
    model_paths: dict[str, str],
    device: DeviceInfo,
    facts: dict[str, ModelInfo],
) -> None:
    """Let the sampler draw only configs this device can run (``search.memory.feasible``)."""
    sampler = study.sampler
    if not isinstance(sampler, ConditionalSampler) or not (opts.use_estimate or opts.use_frontier):
        return
    choices = {model: spec.space.choices_for(model) for model in model_paths}
    sampler.feasible = feasibility(
        choices,
        _config_for(spec, opts, model_paths),
        lambda model: _arch_of(spec, opts, facts, model),
        device,
        use_estimate=opts.use_estimate,
        use_frontier=opts.use_frontier,
    )


def _stop_on_load_error(frozen: optuna.trial.FrozenTrial, spec: StudySpec) -> None:
    error = error_of(frozen)  # the whole line: the stored ``error`` is cut short
    if frozen.state != TrialState.FAIL or not error.startswith("ModelLoadError"):
        return
    model = frozen.user_attrs.get(attrs.MODEL, "?")
    raise RunError(
        f"trial {frozen.number} could not load model {model!r}: "
        f"{error.removeprefix('ModelLoadError: ')} (stopped here rather than fail every "
        f"{model} trial; fix it, or drop {model} from {spec.source or 'the spec'})"
    )


def _run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    spec: StudySpec,
    opts: RunOptions,
    model_paths: dict[str, str],
    device: DeviceInfo,
    storage: optuna.storages.BaseStorage,
    stop: Callable[[], bool] = lambda: False,
    tracker: Tracker | None = None,
    facts: dict[str, ModelInfo] | None = None,
) -> optuna.trial.FrozenTrial:
    """Sample, preflight, train and tell one claimed trial (and its W&B run, if tracked).

    Raises:
        _Interrupted: ``stop()`` became true before the trial finished (its child is gone).
        UpdateFinishedTrialError: The trial was failed as stale meanwhile (child stopped).
    """
    started = time.monotonic()
    params = sample_params(trial, spec)
    cfg = build_config(
        spec,
        params,
        model_path=model_paths.get(params.model),
        device=opts.device,
        seed_offset=trial.number,
    )
    if spec.training.eval_every_steps is not None:  # prune sooner (search.train.partial_eval)
        cfg = dataclasses.replace(
            cfg,
            eval_every_steps=spec.training.eval_every_steps,
            eval_sample_queries=spec.training.eval_sample_queries,
        )
    arch = _arch_of(spec, opts, facts or {}, cfg.model)

    with heartbeat(study, trial):
        decision = preflight(
            cfg,
            arch,
            device,
            study.get_trials(deepcopy=False, states=PREFLIGHT_STATES),
            use_estimate=opts.use_estimate,
            use_frontier=opts.use_frontier,
        )
        cfg = decision.config or cfg  # gradient_cache: auto resolved from the estimate
        first = _trial_attrs(cfg, opts, device, decision.estimate.total_mb, arch.source)
        run = tracker.start(trial.number, cfg) if tracker is not None else NO_RUN
        first.user.update(run.attrs())  # wandb_run_id, wandb_run_path
        if decision.skip:
            first.update(skip_record(decision, time.monotonic() - started))
            write_record(storage, trial._trial_id, first)
            skipped = study.tell(trial, state=TrialState.PRUNED)
            run.finish(skipped)
            return skipped
        # Before training: the dashboard shows it running, with its config.
        write_record(storage, trial._trial_id, first)
        if stop():
            raise _Interrupted()

        metric = spec.study.metric

        def report(epoch: int, metrics: dict[str, float]) -> bool:
            run.log_epoch(epoch, metrics)
            # One step axis for all trials: training examples seen (search.train.partial_eval);
            # an objective that does not say (a fake one) reports on its epochs.
            trial.report(metrics[metric], int(metrics.get("examples_seen", epoch)))
            return trial.should_prune()

        def report_partial(examples_seen: int, metrics: dict[str, float]) -> bool:
            trial.report(metrics[metric], examples_seen)  # the eval sample's score
            return trial.should_prune()

        keeper = keeper_for(study, spec, opts)  # top-K models (search.observe.keep)
        outcome = run_isolated(
            keeper.prepare(cfg, trial.number),  # with save_dir when models are kept
            report=report,
            memory_limit_bytes=opts.memory_limit,
            objective=opts.objective,
            stop=stop,
            on_step=run.log_step if run.active else None,
            report_partial=report_partial,
        )
    # A child killed or failed by the same signal (Ctrl-C reaches the whole process group)
    # is an interruption too, not the trial's failure.
    if outcome.status == "stopped" or (stop() and outcome.status in ("killed", "failed")):
        raise _Interrupted()
    keeper.keep(trial, outcome, metric)  # upload if it enters the top K; never raises
    frozen = _tell(study, trial, outcome, metric, storage, time.monotonic() - started)
    keeper.prune()  # remove the models pushed out of the top K
    run.finish(frozen)
    return frozen


def _trial_attrs(
    cfg: TrialConfig,
    opts: RunOptions,
    device: DeviceInfo,
    estimate_mb: float,
    facts_source: str | None = None,
) -> TrialRecord:
    return claimed_record(
        cfg,
        device,
        host=socket.gethostname(),
        gpu=opts.gpu if opts.gpu is not None else os.environ.get("CUDA_VISIBLE_DEVICES"),
        worker=opts.worker,
        memory_estimate_mb=estimate_mb,
        model_facts=facts_source,
    )


def _tell(
    study: optuna.Study,
    trial: optuna.Trial,
    outcome: TrialOutcome,
    metric: str,
    storage: optuna.storages.BaseStorage,
    seconds: float,
) -> optuna.trial.FrozenTrial:
    """Record an isolated run's outcome on the trial and finish it."""
    record = outcome_record(outcome, metric, seconds)
    write_record(storage, trial._trial_id, record)
    told = record.user[attrs.OUTCOME]
    if told == attrs.OUTCOME_COMPLETE:
        return study.tell(trial, outcome.metrics[metric])
    if told in (attrs.OUTCOME_PRUNED, attrs.OUTCOME_OOM):
        # An OOM is an answer about memory, not a broken trial: PRUNED keeps it in what TPE
        # learns from (FAIL would hide it), and the frontier reads it back (README).
        return study.tell(trial, state=TrialState.PRUNED)
    return study.tell(trial, state=TrialState.FAIL)
