"""How a worker trains one sampled, preflighted config: the trainer protocol and its default.

The trial step (``search.worker.step``) calls ``trainer(cfg, hooks)`` and records what it
returns. ``search run`` / ``search worker`` use :class:`IsolatedTrainer` (the objective in a
child process: ``search.worker.isolation.run_isolated``); a benchmark may pass any callable
with the same signature, e.g. one that sleeps in-process or a surrogate that reports scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from search.record.config import DEFAULT_OBJECTIVE
from search.record.config import TrialConfig
from search.worker.isolation import TrialOutcome
from search.worker.isolation import run_isolated

__all__ = ["IsolatedTrainer", "Report", "TrainHooks", "Trainer"]

Report = Callable[[int, dict[str, float]], bool]


@dataclass(frozen=True)
class TrainHooks:
    """What the step lends a trainer for one trial.

    Args:
        report: ``(epoch, metrics)`` after each evaluation: reports the study's metric to the
            pruner (on ``metrics["examples_seen"]`` when given, else the epoch); True prunes.
        report_partial: ``(examples_seen, metrics)`` for a sooner evaluation on the eval
            sample; True prunes.
        on_step: ``(step, values)`` after each training step, or None (no subscriber wants
            them: do not send them).
        stop: True once the worker was asked to stop (SIGTERM / SIGINT): end the trial.
    """

    report: Report
    report_partial: Report
    on_step: Callable[[int, dict[str, float]], None] | None
    stop: Callable[[], bool]


class Trainer(Protocol):
    """``trainer(cfg, hooks) -> TrialOutcome``: train ``cfg`` and say how it ended."""

    def __call__(self, cfg: TrialConfig, hooks: TrainHooks) -> TrialOutcome: ...


@dataclass(frozen=True)
class IsolatedTrainer:
    """The objective (``module:function``) in a child process of the trial process server.

    Args:
        objective: The objective to run (``search.train.loop:train`` unless a test's).
        memory_limit_bytes: Cap of the trial's memory (``--memory-limit``), or None.
    """

    objective: str = DEFAULT_OBJECTIVE
    memory_limit_bytes: int | None = None

    def __call__(self, cfg: TrialConfig, hooks: TrainHooks) -> TrialOutcome:
        return run_isolated(
            cfg,
            report=hooks.report,
            memory_limit_bytes=self.memory_limit_bytes,
            objective=self.objective,
            stop=hooks.stop,
            on_step=hooks.on_step,
            report_partial=hooks.report_partial,
        )
