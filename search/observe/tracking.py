"""One Weights & Biases run per trial: a thin layer on ``wandb`` that never fails a trial.

The worker owns the run (not the trial's process): its :class:`TrackingSubscriber`, on the
worker's event thread (``search.worker.events``, never on the trial step), starts the run when
a trial has passed sampling and preflight, logs what the trial process streams over its pipe
(per-step loss, learning rate and memory, per-epoch metrics), and finishes it from the trial's
record once Optuna has been told. So a preflight skip (``oom: predicted`` / ``frontier``, no
process) and a process killed by the kernel still get a run with their outcome, and
``wandb``'s service starts once per worker instead of once per trial (BENCHMARKS.md, "W&B
overhead").

Mode: ``$WANDB_MODE`` when set, else online with ``$WANDB_API_KEY``, else offline under the
study's directory (beside the SQLite file, else ``$SEARCH_CACHE``), to ``wandb sync`` later.
The key stays in the environment: it is never passed, logged or written here.

Failures (no ``wandb``, an unwritable directory, a bad key, no network) are logged in one
line; W&B is then off for the rest of this worker, so each costs at most one bounded
``wandb.init`` (``$SEARCH_WANDB_INIT_TIMEOUT`` seconds, default 10) and never the trial.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from search.record import attrs
from search.record.trial_record import TrialRecord
from search.record.trial_record import metrics_of
from search.record.trial_record import outcome_of
from search.record.trial_record import trial_summary
from search.record.trial_record import write_record
from search.worker.events import Claimed
from search.worker.events import Closed
from search.worker.events import Dropped
from search.worker.events import HandedBack
from search.worker.events import Reported
from search.worker.events import Skipped
from search.worker.events import StepLogged
from search.worker.events import Subscriber
from search.worker.events import Told
from storage import compat
from storage import redact_url
from storage import sqlite_file

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from search.record.config import TrialConfig
    from search.spec.options import RunOptions
    from search.spec.study_spec import StudySpec

__all__ = [
    "NO_RUN",
    "TrackingSettings",
    "TrackingSubscriber",
    "Tracker",
    "TrialRun",
    "tracking_settings",
]

_logger = logging.getLogger(__name__)
ENV_INIT_TIMEOUT = "SEARCH_WANDB_INIT_TIMEOUT"
DEFAULT_INIT_TIMEOUT = 10.0
_FINISH_TIMEOUT = 30.0
_LOAD_TIMEOUT = 30.0  # importing wandb and starting its service (local work, once per worker)


@dataclass(frozen=True)
class TrackingSettings:
    """Whether and where this worker's trials become W&B runs.

    Args:
        enabled: ``--wandb/--no-wandb``, else the spec's ``tracking.wandb`` (default off).
        project: ``--wandb-project``, else ``tracking.project``, else the spec's study name.
        directory: Where ``wandb/`` (the offline runs) is written.
        mode: ``online``, ``offline`` or ``disabled``.
        storage: The study's storage URL, redacted (goes into each run's summary).
        entity: ``--wandb-entity``, else ``tracking.entity``; None: ``$WANDB_ENTITY``, else
            the account's default entity (wandb's own choice).
    """

    enabled: bool
    project: str
    directory: Path
    mode: str
    storage: str
    entity: str | None = None

    def describe(self) -> str | None:
        """The one line a run prints at its start when W&B is on (None: it is off).

        Example:
            >>> line = TrackingSettings(True, "p", Path("/s"), "offline", "sqlite:///x").describe()
            >>> line.split(" (")  # doctest: +NORMALIZE_WHITESPACE
            ['W&B on, offline: project p, runs in /s/wandb',
             'upload later: wandb sync /s/wandb/offline-run-*)']
        """
        if not self.enabled:
            return None
        if self.mode == "disabled":
            return "W&B off: WANDB_MODE=disabled"
        entity = self.entity or os.environ.get("WANDB_ENTITY")
        where = f"project {self.project}" + (f", entity {entity}" if entity else "")
        runs = self.directory / "wandb"
        if self.mode == "offline":
            return (
                f"W&B on, offline: {where}, runs in {runs} "
                f"(upload later: wandb sync {runs}/offline-run-*)"
            )
        server = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
        return f"W&B on, online to {server}: {where}"


def _run_directory(storage_url: str, cache_dir: Path) -> Path:
    """The directory of a SQLite study's file, else the cache directory."""
    database = sqlite_file(storage_url)
    return Path(database).expanduser().resolve().parent if database else cache_dir


def _mode() -> str:
    chosen = os.environ.get("WANDB_MODE", "").strip().lower()
    if chosen in ("online", "offline", "disabled"):
        return chosen
    if chosen == "dryrun":
        return "offline"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def tracking_settings(spec: StudySpec, opts: RunOptions) -> TrackingSettings:
    """This worker's W&B settings from its options and the spec's ``tracking`` section."""
    section = spec.tracking
    enabled = opts.wandb if opts.wandb is not None else section.wandb
    project = opts.wandb_project or section.project or spec.study.name
    directory = _run_directory(opts.storage_url, opts.cache_dir)
    entity = opts.wandb_entity or section.entity
    return TrackingSettings(
        enabled, project, directory, _mode(), redact_url(opts.storage_url), entity
    )


def _init_timeout() -> float:
    try:
        return max(1.0, float(os.environ.get(ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT)))
    except ValueError:
        return DEFAULT_INIT_TIMEOUT


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _settings(wandb: Any) -> Any:
    """Quiet, bounded run settings; names this wandb version lacks are left out."""
    wanted: dict[str, Any] = {
        "init_timeout": _init_timeout(),
        "finish_timeout": _FINISH_TIMEOUT,
        "silent": True,
        "console": "off",  # the worker's own output stays the worker's
        "x_disable_stats": True,  # memory comes from the trial process itself
        "x_disable_meta": True,  # no command line (it may hold --storage)
        "x_save_requirements": False,  # listing the packages costs ~0.8 s a run
        "save_code": False,
        "disable_git": True,
    }
    known = getattr(wandb.Settings, "model_fields", None)
    if known is not None:
        wanted = {k: v for k, v in wanted.items() if k in known}
    return wandb.Settings(**wanted)


class TrialRun:
    """One trial's W&B run, or nothing (``NO_RUN``): every method is safe to call."""

    def __init__(self, tracker: Tracker | None = None, run: Any = None, number: int = -1) -> None:
        self._tracker = tracker
        self._run = run
        self._number = number
        self._step = 0
        if tracker is not None and run is not None:
            tracker.current = self

    @property
    def active(self) -> bool:
        """Whether a run is open (logging goes somewhere)."""
        return self._run is not None

    def attrs(self) -> dict[str, str]:
        """The trial's user attributes naming the run (empty without one)."""
        if self._run is None:
            return {}
        return {attrs.WANDB_RUN_ID: str(self._run.id), attrs.WANDB_RUN_PATH: str(self._run.path)}

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self._run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - W&B never fails a trial
            _logger.warning("W&B %s failed, W&B off for this worker: %s", what, _one_line(exc))
            if self._tracker is not None:
                self._tracker.disable()
            run, self._run = self._run, None
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001, S110 - already reported once
                pass

    def log_step(self, step: int, values: dict[str, float]) -> None:
        """One training step: ``loss``, ``lr``, ``memory_mb`` under ``train/``."""
        self._step = max(self._step, step)
        row = {f"train/{k}": v for k, v in values.items()}
        self._call("log", self._log, {"train/step": step, **row})

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """One evaluation: the metrics under ``eval/``, with the epoch."""
        row = {f"eval/{k}": v for k, v in metrics.items() if k != "epoch"}
        self._call("log", self._log, {"epoch": epoch, "train/step": self._step, **row})

    def _log(self, row: dict[str, Any]) -> None:
        self._run.log(row)

    def finish(
        self, trial: FrozenTrial | None, *, outcome: str | None = None, error: str | None = None
    ) -> None:
        """Write the summary from the trial's record and close the run.

        Args:
            trial: The trial as told to Optuna (``None``: it was handed back or dropped).
            outcome: Overrides the outcome read from the record (e.g. ``handed_back``).
            error: Why, when ``trial`` is None.
        """
        if self._run is None:
            return
        summary = {"trial": self._number, **_summary(trial, outcome, self._tracker)}
        if error:
            summary[attrs.ERROR] = error
        failed = summary.get("outcome") == attrs.OUTCOME_FAILED
        self._call("summary", self._run.summary.update, summary)
        self._call("finish", self._finish, 1 if failed else 0)

    def _finish(self, exit_code: int) -> None:
        run, self._run = self._run, None
        if self._tracker is not None and self._tracker.current is self:
            self._tracker.current = None
        run.finish(exit_code=exit_code)


NO_RUN = TrialRun()
"""The run of a trial that has none (W&B off or broken)."""


def _summary(
    trial: FrozenTrial | None, outcome: str | None, tracker: Tracker | None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if tracker is not None:
        out.update({"study": tracker.study_name, "storage": tracker.settings.storage})
    if trial is None:
        out["outcome"] = outcome or attrs.OUTCOME_HANDED_BACK
        return out
    ua = trial.user_attrs
    out.update({"trial": trial.number, "state": trial.state.name.lower()})
    out["outcome"] = outcome or outcome_of(trial)
    out["note"] = trial_summary(trial)
    if trial.value is not None:
        out["value"] = trial.value
    for key in (
        attrs.OOM_KIND,
        attrs.OOM_PHASE,
        attrs.OOM_FRONTIER_TRIAL,
        attrs.ERROR,
        attrs.PEAK_MEMORY_MB,
        attrs.MEMORY_ESTIMATE_MB,
        attrs.DEVICE,
        attrs.DEVICE_MEMORY_MB,
        attrs.SECONDS,
        attrs.WORKER,
    ):
        if ua.get(key) is not None:
            out[key] = ua[key]
    for name, value in metrics_of(trial).items():
        out[f"eval/{name}"] = value
    return out


class Tracker:
    """Starts one W&B run per trial of one worker; turns itself off at the first failure."""

    def __init__(self, settings: TrackingSettings, study_name: str) -> None:
        self.settings = settings
        self.study_name = study_name
        self._on = settings.enabled and settings.mode != "disabled"
        self._wandb: Any = None
        self._loading: threading.Thread | None = None
        self._load_error: BaseException | None = None
        self.current: TrialRun | None = None  # the run started and not yet finished

    def prepare(self) -> None:
        """Import wandb and start its service in the background (call before slow start-up).

        About 1-3 s once per worker (the import, ``wandb.setup()``, and ``wandb.sdk.launch``
        that the first ``wandb.init`` imports), overlapped with the trial server's start
        instead of added to the first trial.
        """
        if self._on and self._loading is None and self._wandb is None:
            self._loading = threading.Thread(target=self._load, name="wandb-load", daemon=True)
            self._loading.start()

    def _load(self) -> None:
        try:
            wandb = importlib.import_module("wandb")
            importlib.import_module("wandb.sdk.launch")  # imported by the first wandb.init
            wandb.setup()
            self._wandb = wandb
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._load_error = exc

    @property
    def on(self) -> bool:
        """Whether trials still get runs."""
        return self._on

    def disable(self) -> None:
        """No more runs in this worker (after a failure, already logged)."""
        self._on = False

    def abandon(self, outcome: str, error: str | None = None) -> None:
        """Finish the open run of a trial that was not told (handed back, or failed as stale)."""
        if self.current is not None:
            self.current.finish(None, outcome=outcome, error=error)

    def _fail(self, what: str, exc: BaseException) -> TrialRun:
        _logger.warning("W&B %s failed, W&B off for this worker: %s", what, _one_line(exc))
        self._on = False
        return NO_RUN

    def ready(self) -> bool:
        """On, and wandb imported (without waiting for the import)."""
        return self._on and self._wandb is not None and self._load_error is None

    def wait_ready(self, timeout: float) -> bool:
        """``ready()``, after waiting at most ``timeout`` s for the import ``prepare`` began."""
        if self._on and self._loading is not None:
            self._loading.join(timeout)
        return self.ready()

    def run_path(self, run_id: str) -> str:
        """The W&B path a run of this id gets: ``[entity/]project/run_id``."""
        entity = self.settings.entity or os.environ.get("WANDB_ENTITY")
        parts = (entity, self.settings.project, run_id)
        return "/".join(p for p in parts if p)

    def check_directory(self) -> None:
        """Turn W&B off now (one warning) when its run directory cannot be written."""
        if not self._on:
            return
        try:
            self._runs_directory()
        except Exception as exc:  # noqa: BLE001 - W&B never fails a trial
            self._fail(f"init ({self.settings.mode}, {self.settings.directory})", exc)

    def _runs_directory(self) -> None:
        # wandb falls back to a temporary directory it cannot write: check here instead.
        runs = self.settings.directory / "wandb"
        runs.mkdir(parents=True, exist_ok=True)
        if not os.access(runs, os.W_OK):
            raise PermissionError(f"{runs} is not writable")

    def start(self, trial_number: int, cfg: TrialConfig, run_id: str | None = None) -> TrialRun:
        """The trial's run (``NO_RUN`` when W&B is off or fails to start); ``run_id``: the
        run's id, chosen by the caller (else W&B's)."""
        if not self._on:
            return NO_RUN
        if self._loading is None and self._wandb is None:
            self._load()  # prepare() was not called
        elif self._loading is not None:
            self._loading.join(_LOAD_TIMEOUT)
            if self._loading.is_alive():
                slow = TimeoutError(f"importing wandb took over {_LOAD_TIMEOUT:g} s")
                return self._fail("import", slow)
            self._loading = None
        if self._load_error is not None or self._wandb is None:
            return self._fail("import", self._load_error or ImportError("wandb"))
        wandb = self._wandb
        try:
            self._runs_directory()
            run = wandb.init(
                id=run_id,
                project=self.settings.project,
                entity=self.settings.entity,  # None: $WANDB_ENTITY, else the account's
                group=self.study_name,
                job_type=cfg.model,
                name=f"{self.study_name}-trial-{trial_number}",
                config=cfg.to_json(),
                dir=str(self.settings.directory),
                mode=self.settings.mode,  # type: ignore[arg-type]  # checked by _mode()
                reinit="create_new",
                settings=_settings(wandb),
            )
        except Exception as exc:  # noqa: BLE001 - W&B never fails a trial
            return self._fail(f"init ({self.settings.mode}, {self.settings.directory})", exc)
        return TrialRun(self, run, trial_number)


class TrackingSubscriber(Subscriber):
    """One W&B run per trial of this worker, from its trial events (``search.worker.events``).

    Runs start, log and finish on the worker's event thread, never on the trial step. The
    trial names its run (``wandb_run_id``, ``wandb_run_path``): offline (the default without a
    key), in its first record, the id being chosen before the run starts (only once wandb is
    imported and its directory writable, so a broken W&B names no run); online, once
    ``wandb.init`` returned, while the trial still runs (a trial that ended first, e.g. a
    preflight skip, is named only in its run's summary).
    """

    def __init__(self, settings: TrackingSettings, study_name: str) -> None:
        self.tracker = Tracker(settings, study_name)
        self.tracker.prepare()  # imports wandb on a thread while the worker starts
        self.tracker.check_directory()
        self._planned: dict[int, str] = {}  # trial number -> the run id in its first record
        self._runs: dict[int, TrialRun] = {}

    def trial_attrs(self, event: Claimed) -> dict[str, Any]:
        # Offline, the first claim waits for wandb's import (begun at the worker's start, at
        # most the init timeout): a busy machine must not leave a fast trial without its run.
        if self.tracker.settings.mode != "offline" or not self.tracker.wait_ready(_init_timeout()):
            return {}
        run_id = uuid.uuid4().hex[:12]
        self._planned[event.number] = run_id
        return {attrs.WANDB_RUN_ID: run_id, attrs.WANDB_RUN_PATH: self.tracker.run_path(run_id)}

    def on_claimed(self, event: Claimed) -> None:
        planned = self._planned.pop(event.number, None)
        run = self.tracker.start(event.number, event.config, run_id=planned)
        if not run.active:
            return
        self._runs[event.number] = run
        if planned is None:  # name the run on the trial while it runs (not once it is told)
            try:
                storage = compat.study_storage(event.study)
                write_record(storage, event.trial_id, TrialRecord(user=run.attrs()))
            except Exception as exc:  # noqa: BLE001 - told already: its run keeps the number
                _logger.debug("trial %d not named its W&B run: %r", event.number, exc)

    def on_step(self, event: StepLogged) -> None:
        run = self._runs.get(event.number)
        if run is not None:
            run.log_step(event.step, event.values)

    def on_reported(self, event: Reported) -> None:
        run = self._runs.get(event.number)
        if run is not None and not event.partial:
            run.log_epoch(event.step, event.metrics)

    def on_skipped(self, event: Skipped) -> None:
        self._finish(event.number, event.frozen)

    def on_told(self, event: Told) -> None:
        self._finish(event.number, event.frozen)

    def on_handed_back(self, event: HandedBack) -> None:
        self._finish(event.number, None, outcome=attrs.OUTCOME_HANDED_BACK)

    def on_dropped(self, event: Dropped) -> None:
        error = "failed as stale and re-queued elsewhere"
        self._finish(event.number, None, outcome=attrs.OUTCOME_FAILED, error=error)

    def on_closed(self, event: Closed) -> None:
        for number in list(self._runs):
            self._finish(number, None, outcome=attrs.OUTCOME_HANDED_BACK)

    def _finish(self, number: int, frozen: FrozenTrial | None, **why: str) -> None:
        run = self._runs.pop(number, None)
        if run is not None:
            run.finish(frozen, **why)
