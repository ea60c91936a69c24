"""What a worker's trial step tells its observers: events, and the subscriber base class.

The step (``search.worker.step``) emits one event at each point of a trial's life; observers
(dashboard notes, W&B runs, kept top-K models: ``search.observe``; a user's own through
``search run/worker --callback module:name``) subclass :class:`Subscriber` and override the
methods they need, like Optuna's ``optimize`` callbacks. Events are delivered in order on one
background thread per worker (``search.worker.dispatch``), never under the budget lock and
never on the step's own thread, so a slow or hanging observer cannot delay a claim.

The synchronous hooks are :meth:`Subscriber.trial_attrs` and
:meth:`Subscriber.training_config`: they run on the step's thread before training and may only
compute (W&B's run id; keep's model directory is a path, the trial's process creates it),
never wait on I/O.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any
from typing import ClassVar

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from search.record.config import TrialConfig
    from search.worker.isolation import TrialOutcome

__all__ = [
    "CallbackError",
    "Claimed",
    "Closed",
    "Dropped",
    "Event",
    "FunctionCallback",
    "HandedBack",
    "Reported",
    "Requeued",
    "Skipped",
    "StepLogged",
    "Subscriber",
    "Told",
    "load_subscriber",
]


@dataclass(frozen=True)
class Event:
    """Something that happened to the worker's study; ``kind`` names the subscriber method."""

    kind: ClassVar[str] = "event"
    study: optuna.Study


@dataclass(frozen=True)
class Claimed(Event):
    """A trial was claimed, sampled and preflighted; its first record is written.

    ``config`` is what it trains (the gradient cache resolved, before ``training_config``).
    """

    kind: ClassVar[str] = "claimed"
    number: int
    trial_id: int
    config: TrialConfig
    params: dict[str, Any]
    estimate_mb: float


@dataclass(frozen=True)
class StepLogged(Event):
    """One training step of the running trial: ``loss``, ``lr``, ``memory_mb``."""

    kind: ClassVar[str] = "step"
    number: int
    step: int
    values: dict[str, float]


@dataclass(frozen=True)
class Reported(Event):
    """An evaluation reported to the pruner (``partial``: a sooner one on an eval sample)."""

    kind: ClassVar[str] = "reported"
    number: int
    step: int
    metrics: dict[str, float]
    partial: bool = False


@dataclass(frozen=True)
class Skipped(Event):
    """A preflight skip (``oom: predicted`` / ``frontier``), told PRUNED without training."""

    kind: ClassVar[str] = "skipped"
    number: int
    trial_id: int
    frozen: FrozenTrial
    reason: str


@dataclass(frozen=True)
class Told(Event):
    """A trial this worker trained was told (COMPLETE, PRUNED or FAIL): ``frozen`` as told."""

    kind: ClassVar[str] = "told"
    number: int
    trial_id: int
    frozen: FrozenTrial
    outcome: TrialOutcome
    config: TrialConfig


@dataclass(frozen=True)
class Requeued(Event):
    """A stale trial (its worker stopped beating) was failed and re-queued by this worker."""

    kind: ClassVar[str] = "requeued"
    number: int
    trial_id: int


@dataclass(frozen=True)
class HandedBack(Event):
    """This worker's trial was handed back on SIGTERM / SIGINT (failed and re-queued)."""

    kind: ClassVar[str] = "handed_back"
    number: int
    trial_id: int


@dataclass(frozen=True)
class Dropped(Event):
    """This worker's trial was failed as stale and re-queued elsewhere; its result is dropped."""

    kind: ClassVar[str] = "dropped"
    number: int
    trial_id: int


@dataclass(frozen=True)
class Closed(Event):
    """This worker leaves the study (the run ended: budget, timeout or signal)."""

    kind: ClassVar[str] = "closed"
    stopped_by: str


class Subscriber:
    """An observer of one worker's trials: every method is a no-op; override what you need.

    Methods other than :meth:`training_config` run on the worker's event thread, in the order
    the events happened; one that raises is logged once per subscriber and event kind and the
    worker goes on. ``on_step`` events are only produced while some subscriber overrides it.
    """

    def training_config(self, event: Claimed, cfg: TrialConfig) -> TrialConfig:
        """Synchronous, on the step's thread before training: the config to train.

        Compute only (a path, a flag): no I/O that can block, no database call. The default
        returns ``cfg`` unchanged.
        """
        return cfg

    def trial_attrs(self, event: Claimed) -> dict[str, Any]:
        """Synchronous, on the step's thread: user attributes for the trial's first record.

        Compute only, like :meth:`training_config` (W&B names the run it will start). The
        default adds none.
        """
        return {}

    def on_claimed(self, event: Claimed) -> None:
        """A trial was claimed, sampled, preflighted and recorded as running."""

    def on_step(self, event: StepLogged) -> None:
        """One training step of the running trial."""

    def on_reported(self, event: Reported) -> None:
        """An evaluation of the running trial was reported to the pruner."""

    def on_skipped(self, event: Skipped) -> None:
        """A preflight skip was told."""

    def on_told(self, event: Told) -> None:
        """A trained trial was told."""

    def on_requeued(self, event: Requeued) -> None:
        """A stale trial was failed and re-queued by this worker."""

    def on_handed_back(self, event: HandedBack) -> None:
        """This worker's trial was handed back (SIGTERM / SIGINT)."""

    def on_dropped(self, event: Dropped) -> None:
        """This worker's trial was failed as stale elsewhere; its result is dropped."""

    def on_closed(self, event: Closed) -> None:
        """The worker leaves the study (the last event)."""


class FunctionCallback(Subscriber):
    """``fn(study, frozen_trial)`` after each trial this worker told, like Optuna's callbacks."""

    def __init__(self, fn: Callable[[optuna.Study, FrozenTrial], object]) -> None:
        self.fn = fn

    def __repr__(self) -> str:
        return f"FunctionCallback({getattr(self.fn, '__qualname__', self.fn)!r})"

    def on_told(self, event: Told) -> None:
        self.fn(event.study, event.frozen)

    def on_skipped(self, event: Skipped) -> None:
        self.fn(event.study, event.frozen)


class CallbackError(ValueError):
    """A ``--callback`` that cannot be loaded; the message is one line naming it."""


def load_subscriber(ref: str) -> Subscriber:
    """The subscriber ``module:name`` names (``search run/worker --callback``).

    ``name`` may be a :class:`Subscriber` subclass (instantiated without arguments), a
    :class:`Subscriber` instance, or a function ``fn(study, frozen_trial)`` called after each
    trial this worker told or skipped (:class:`FunctionCallback`).

    Raises:
        CallbackError: No such module or name, or something else.
    """
    module_name, _, name = ref.partition(":")
    if not module_name or not name:
        raise CallbackError(f"--callback {ref!r}: expected MODULE:NAME")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CallbackError(f"--callback {ref!r}: cannot import {module_name}: {exc}") from None
    target = getattr(module, name, None)
    if inspect.isclass(target) and issubclass(target, Subscriber):
        return target()
    if isinstance(target, Subscriber):
        return target
    if callable(target) and not inspect.isclass(target):
        return FunctionCallback(target)
    what = "nothing" if target is None else type(target).__name__
    raise CallbackError(
        f"--callback {ref!r}: {module_name}.{name} is {what}, not a Subscriber or a function "
        f"fn(study, frozen_trial)"
    )
