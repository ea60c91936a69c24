"""A worker on one study: what it knows, opened once; its trials run one step at a time.

:meth:`Worker.open` does the once-per-worker work of ``search run`` / ``search worker``: it
checks the data, opens the storage (or takes the one the caller opened), resolves the models
and their facts, opens or creates the study (baselines, budget), builds the sampler, pruner,
stage plan and feasible grid, starts the trial process server and the stale-trial watcher.
:meth:`Worker.step` then runs one trial end to end (``search.worker.step.run_step``);
``search.worker.runner.run_study`` is the loop over it. Observers subscribe to the worker's
events (``search.worker.events``); :meth:`Worker.close` flushes them within a bound.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from dataclasses import field
from types import TracebackType
from typing import TYPE_CHECKING

import optuna

from search.memory.device import DeviceInfo
from search.memory.device import device_info
from search.memory.feasible import PREFLIGHT_STATES
from search.memory.feasible import Decisions
from search.memory.feasible import FeasibleGrid
from search.memory.feasible import feasibility
from search.memory.feasible import feasible_grid
from search.memory.feasible import preflight_fits
from search.record import attrs
from search.record.config import TrialConfig
from search.record.models import ModelInfo
from search.record.stored_spec import store_spec_of
from search.record.trial_record import name_metric
from search.sampling.pruners import make_pruner
from search.sampling.sampler import ConditionalSampler
from search.sampling.sampler import make_sampler
from search.sampling.space import SampledParams
from search.sampling.space import build_config
from search.sampling.stages import StagePlan
from search.spec.model_facts import resolve_facts
from search.spec.model_resolve import recorded_models
from search.spec.model_resolve import searched_models
from search.spec.options import RunOptions
from search.spec.options import study_name_for
from search.spec.stage_check import grid_choices_for
from search.spec.stage_check import stage_models
from search.spec.study_spec import StudySpec
from search.train.data import validate_data
from search.train.tiny_layout import tiny_info
from search.worker.budget import StaleTrial
from search.worker.budget import ensure_budget
from search.worker.budget import watch_stale
from search.worker.dispatch import EventDispatcher
from search.worker.dispatch import flush_seconds
from search.worker.events import Closed
from search.worker.events import Requeued
from search.worker.events import Subscriber
from search.worker.isolation import warm_up
from search.worker.load_failures import LoadFailures
from search.worker.prepare import model_facts
from search.worker.prepare import prepare_models
from search.worker.step import StepResult
from search.worker.step import finished_of
from search.worker.step import run_step
from search.worker.study_store import is_replica_path
from search.worker.study_store import open_study
from search.worker.trainer import IsolatedTrainer
from search.worker.trainer import Trainer
from storage import create_storage

if TYPE_CHECKING:
    from optuna.pruners import BasePruner
    from optuna.samplers import BaseSampler
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

__all__ = ["Worker"]


@dataclass
class Worker:
    """What one worker knows about its study; build it with :meth:`open`.

    Attributes:
        spec: The study spec.
        opts: This worker's options.
        storage: The one storage this worker opened (or was given).
        study: The study, with its sampler and pruner.
        budget: The study's budget in force.
        device: This worker's device and the memory a trial may use on it.
        facts: Each searched model's architecture facts (for the memory estimate).
        model_paths: What each searched model loads (a tiny replica's directory with --tiny).
        searched: The models this worker searches.
        trainer: How a config is trained (default: isolated in a child process).
        events: The subscribers' dispatcher.
        stage_plan: The claim hook of a staged search, else None.
        load_failures: The models given up because their trials keep failing to load them.
    """

    spec: StudySpec
    opts: RunOptions
    storage: BaseStorage
    study: optuna.Study
    budget: int
    device: DeviceInfo
    facts: dict[str, ModelInfo]
    model_paths: dict[str, str]
    searched: list[str]
    trainer: Trainer
    events: EventDispatcher
    stage_plan: StagePlan | None = None
    load_failures: LoadFailures = field(default_factory=lambda: LoadFailures([]))
    _watch: AbstractContextManager[None] | None = field(default=None, repr=False)
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def open(
        cls,
        spec: StudySpec,
        opts: RunOptions,
        *,
        storage: BaseStorage | None = None,
        subscribers: Sequence[Subscriber] = (),
        check_data: bool = True,
        device: DeviceInfo | None = None,
        facts: dict[str, ModelInfo] | None = None,
        model_paths: dict[str, str] | None = None,
        trainer: Trainer | None = None,
        sampler: BaseSampler | None = None,
        pruner: BasePruner | None = None,
        baselines: bool = True,
        warm: bool = True,
    ) -> Worker:
        """Open the study for one worker (see the module docstring).

        Args:
            spec: The study spec.
            opts: This worker's options.
            storage: An open storage (the CLI's, opened once for its checks); None: open
                ``opts.storage_url``.
            subscribers: The observers of this worker's trials.
            check_data: Validate the data first (False: the caller just did).
            device: The device (a surrogate's); None: ``device_info(opts.device)``.
            facts: Model facts to estimate from; None: resolved (tiny replicas' with --tiny).
            model_paths: What each model loads (the models searched: those of the spec named
                here, no weights checked); None: ``prepare_models`` (builds replicas).
            trainer: How a config is trained; None: :class:`IsolatedTrainer`.
            sampler: The study's sampler; None: ``make_sampler(spec)``.
            pruner: The study's pruner; None: ``make_pruner(spec)``.
            baselines: Enqueue one baseline trial per (first-stage) model in a new study.
            warm: Start the trial process server now (only for the default trainer).
        """
        flush_seconds()  # a bad $SEARCH_EVENTS_FLUSH_S stops here, before any work
        if check_data:  # False when the caller (the CLI) has just checked the same files
            validate_data(
                spec.resolve_path(spec.data.train),
                spec.resolve_path(spec.data.eval),
                spec.data.split,
            )
        if opts.gpu is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = opts.gpu
        if warm and trainer is None:
            # Start the trial process server now (it imports torch once, seconds, in its own
            # process), so that it does so while the storage, the models and the study are
            # opened, not after. The user's mistakes were answered before (the CLI's checks).
            warm_up(opts.objective)
        # Connect (and check the schema) before anything slow: an unreachable server or a
        # wrong database name is answered before tiny replicas are built or weights resolved.
        if storage is None:
            storage = create_storage(opts.storage_url)
        name = study_name_for(spec, opts)
        recorded = recorded_models(storage, name)
        if model_paths is None:
            # Exit 2 on a missing model, before the study is opened (the CLI checked it).
            searched = searched_models(spec, opts, recorded)
            model_paths = prepare_models(spec, opts, searched)
        else:  # the caller says what loads: no weights to look for
            searched = [m for m in spec.models if m in model_paths and m in (recorded or [m])]
        if facts is None:
            facts = model_facts(spec, opts, model_paths)
        study, _ = open_study(
            storage,
            name,
            direction=spec.study.direction,
            sampler=sampler or make_sampler(spec, seed=opts.seed, models=searched),
            pruner=pruner or make_pruner(spec),
            on_create=_init_study(spec, opts, searched, baselines=baselines),
            # what trains: --tiny, or replicas handed in as the model paths
            replicas=opts.tiny or any(map(is_replica_path, model_paths.values())),
        )
        budget = ensure_budget(study, opts.n_trials, change=opts.set_n_trials)
        name_metric(study, spec.study.metric)  # dashboard plots say "ndcg@10" (old studies too)
        worker = cls(
            spec=spec,
            opts=opts,
            storage=storage,
            study=study,
            budget=budget,
            device=device or device_info(opts.device, memory_limit=opts.memory_limit),
            facts=dict(facts),
            model_paths=dict(model_paths),
            searched=list(searched),
            trainer=trainer or IsolatedTrainer(opts.objective, opts.memory_limit),
            events=EventDispatcher(subscribers),
        )
        worker.stage_plan = worker._make_stage_plan()
        worker.load_failures = LoadFailures(worker.searched, str(spec.source or "the spec"))
        choices = worker.grid_choices()
        if choices is not None and isinstance(study.sampler, ConditionalSampler):
            # Outside a step (nothing pinned) the sampler asks the study itself.
            study.sampler.feasible = feasibility(
                choices,
                worker.config_for,
                worker.arch_of,
                worker.device,
                use_estimate=opts.use_estimate,
                use_frontier=opts.use_frontier,
            )
        worker._watch = watch_stale(study, on_requeued=worker.on_requeued)
        worker._watch.__enter__()
        return worker

    # ------------------------------------------------------------------ the step

    def step(self, stop: Callable[[], bool] = lambda: False, *, wait: bool = True) -> StepResult:
        """Run one trial end to end (``search.worker.step.run_step``).

        Raises:
            RunError: Every searched model was given up: its trials kept failing to load it
                (``search.worker.load_failures``).
        """
        result = run_step(self, stop, wait=wait)
        if result.frozen is not None:
            given_up = self.load_failures.note(result.frozen)
            if given_up is not None and isinstance(self.study.sampler, ConditionalSampler):
                self.study.sampler.exclude(given_up)
        return result

    def progress(self) -> tuple[int, int]:
        """``(budget, finished)``: the study's budget and its finished trials (one read)."""
        trials = self.study.get_trials(deepcopy=False)
        return self.budget, finished_of(list(trials))

    def close(self, *, stopped_by: str = "budget", signalled: bool = False) -> bool:
        """Leave the study: stop the stale-trial watcher, send ``closed``, flush the events.

        Waits at most ``$SEARCH_EVENTS_FLUSH_S`` seconds for the observers (60 by default,
        at most 5 after SIGTERM / SIGINT); returns whether they were all done.
        """
        if self._closed:
            return True
        self._closed = True
        if self._watch is not None:
            self._watch.__exit__(None, None, None)
            self._watch = None
        self.events.emit(Closed(self.study, stopped_by))
        return self.events.close(flush_seconds(signalled=signalled))

    def __enter__(self) -> Worker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(stopped_by="error" if exc_type is not None else "budget")

    # ------------------------------------------------------------------ what the step asks

    def arch_of(self, model: str) -> ModelInfo:
        """The facts the preflight estimates ``model`` from: the worker's, else resolved now
        (a tiny replica's when ``--tiny``)."""
        if model not in self.facts:
            arch = resolve_facts(self.spec, model)
            if self.opts.tiny:
                arch = tiny_info(arch)
            self.facts[model] = arch
        return self.facts[model]

    def config_for(self, model: str, batch_size: int, max_len: int) -> TrialConfig:
        """A model's config at a batch size and length, the other settings mid-range (for
        memory questions: learning rate and the like do not change the peak)."""
        space = self.spec.space
        mid = {
            name: (rng.low * rng.high) ** 0.5 if rng.log else (rng.low + rng.high) / 2
            for name, rng in (("lr", space.lr), ("temperature", space.temperature),
                              ("warmup_ratio", space.warmup_ratio),
                              ("weight_decay", space.weight_decay))
        }  # fmt: skip
        params = SampledParams(model=model, batch_size=batch_size, max_len=max_len, **mid)
        return build_config(
            self.spec, params, model_path=self.model_paths.get(model), device=self.opts.device
        )

    def grid_choices(self) -> dict[str, dict[str, list[int]]] | None:
        """Each searched model's choices the feasible grid asks about; None: no grid (the
        preflight is off, or the sampler cannot narrow its draws)."""
        opts = self.opts
        if not isinstance(self.study.sampler, ConditionalSampler):
            return None
        if not (opts.use_estimate or opts.use_frontier):
            return None
        return {m: grid_choices_for(self.spec, m) for m in self.model_paths}

    def preflight_fits(self, cfg: TrialConfig, trials: Sequence[FrozenTrial]) -> bool:
        """Whether this worker's preflight lets ``cfg`` run given ``trials`` (a frontier seed)."""
        return preflight_fits(
            cfg,
            self.arch_of(cfg.model),
            self.device,
            trials,
            use_estimate=self.opts.use_estimate,
            use_frontier=self.opts.use_frontier,
        )

    def feasible_grid(
        self, trials: Sequence[FrozenTrial], decisions: Decisions
    ) -> FeasibleGrid | None:
        """The feasible grid of ``trials`` (the step's snapshot) for this worker's device,
        filling ``decisions`` with each pair's preflight; None without a grid."""
        choices = self.grid_choices()
        if choices is None:
            return None
        return feasible_grid(
            choices,
            self.config_for,
            self.arch_of,
            self.device,
            [t for t in trials if t.state in PREFLIGHT_STATES],
            use_estimate=self.opts.use_estimate,
            use_frontier=self.opts.use_frontier,
            decisions=decisions,
        )

    # ------------------------------------------------------------------ internals

    def _make_stage_plan(self) -> StagePlan | None:
        if not self.spec.stages:
            return None
        return StagePlan(
            self.spec,
            self.study.sampler,
            self.budget,
            config_for=self.config_for,
            device_total_bytes=self.device.total_bytes,
            seed=self.opts.seed,
            fits=self.preflight_fits if self.grid_choices() is not None else None,
        )

    def on_requeued(self, stale: list[StaleTrial]) -> None:
        """Tell the observers about stale trials re-queued here (called after the lock)."""
        for trial in stale:  # after the budget lock: queued, never blocking
            self.events.emit(Requeued(self.study, trial.number, trial.trial_id))


def _init_study(
    spec: StudySpec, opts: RunOptions, searched: list[str], *, baselines: bool = True
) -> Callable[[optuna.Study], None]:
    def init(study: optuna.Study) -> None:
        store_spec_of(study, spec.public_dict())
        ensure_budget(study, opts.n_trials or spec.study.n_trials)
        if list(searched) != list(spec.models):  # --skip-unavailable left some out
            study.set_user_attr(attrs.STUDY_MODELS, list(searched))
        if not baselines:
            return
        # One baseline trial per model, so no model is left out of the first trials by chance.
        # In a staged search: the first stage's models, recorded in that stage.
        first = spec.stages[0] if spec.stages else None
        for model in [m for m in (stage_models(spec, first) if first else spec.models)
                      if m in searched]:  # fmt: skip
            stage = {attrs.STAGE: first.name} if first else None
            study.enqueue_trial({"model": model}, user_attrs=stage)

    return init
