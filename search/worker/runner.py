"""The study loop of ``search run`` / ``search worker``: one worker's trial steps until the end.

``search run`` and ``search worker`` both call :func:`run_study`; a run is one worker that
happens to be alone. It opens the worker once (``search.worker.worker.Worker.open``), then
runs :meth:`Worker.step <search.worker.worker.Worker.step>` (claim, sample, preflight, train,
record, tell: ``search.worker.step``) until the budget is spent, ``--timeout`` passes or
SIGTERM / SIGINT arrives (the running trial is then handed back), and reports progress.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

import optuna

from search.spec.options import RunOptions
from search.spec.study_spec import StudySpec
from search.worker.events import Subscriber
from search.worker.worker import Worker
from storage import redact_url

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

__all__ = ["RunOptions", "RunSummary", "run_study"]

_STOP_SIGNALS: dict[int, str] = {signal.SIGTERM: "sigterm", signal.SIGINT: "sigint"}


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
    storage: BaseStorage | None = None,
    subscribers: Sequence[Subscriber] = (),
    on_trial: TrialCallback | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    check_data: bool = True,
) -> RunSummary:
    """Run trials of ``spec``'s study until its budget is spent, the timeout passes or a signal.

    Data are validated before anything is written to the study (``check_data=False``: the
    caller just did). ``storage``: the storage the caller opened (else ``opts.storage_url`` is
    opened). ``subscribers`` observe the trials (dashboard notes, W&B, kept models:
    ``search.observe.subscribers.standard_subscribers``; none by default). ``on_progress`` gets
    the study's budget and its finished trials (all workers'), at the start, after each trial
    of this worker (as of its claim, plus its own) and at the end; ``on_trial`` each trial
    this worker finished. SIGTERM or SIGINT hands the running trial back (``handed_back``) and
    stops; a trial that was failed as stale and re-queued elsewhere while this worker was cut
    off is dropped, and the worker goes on.
    """
    worker = Worker.open(
        spec, opts, storage=storage, subscribers=subscribers, check_data=check_data
    )
    deadline = time.monotonic() + opts.timeout if opts.timeout else None
    trials_run = 0
    stopped_by = "budget"
    handed_back = None
    try:
        if on_progress is not None:
            on_progress(*worker.progress())
        with _stop_on_signals() as stop:
            while True:
                if stop():
                    stopped_by = stop.reason
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    stopped_by = "timeout"
                    break
                result = worker.step(stop)
                if result.handed_back:
                    handed_back = result.number
                if result.stopped:
                    stopped_by = stop.reason if stop() else stopped_by
                    break
                if result.frozen is not None:
                    trials_run += 1
                    if on_trial is not None:
                        on_trial(result.frozen)
                if on_progress is not None and result.finished >= 0:
                    on_progress(result.budget, result.finished)
    except BaseException:
        stopped_by = "error"
        raise
    finally:
        worker.close(stopped_by=stopped_by, signalled=stopped_by in _STOP_SIGNALS.values())
    if on_progress is not None:  # the other workers' last trials may have ended since
        on_progress(*worker.progress())
    return RunSummary(
        worker.study.study_name,
        redact_url(opts.storage_url),
        trials_run,
        stopped_by,
        worker.study,
        handed_back,
    )
