"""Deliver a worker's events to its subscribers on one ordered background thread.

The bound: :meth:`EventDispatcher.emit` never blocks (the step only puts the event on a queue
of ``max_queue`` events; when a subscriber has fallen that far behind, further events are
dropped and that is logged once per event kind), so a subscriber that raises or hangs delays
no claim and no trial. At the end of the run :meth:`EventDispatcher.close` waits at most
``$SEARCH_EVENTS_FLUSH_S`` seconds (default :data:`FLUSH_S`; :data:`FLUSH_AFTER_SIGNAL_S`
after SIGTERM / SIGINT) for the queue to empty, then leaves the rest to the daemon thread,
which ends with the process. A subscriber that raises is logged once per subscriber and event
kind (later failures of the same kind at debug level), and the next event is delivered.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

from search.record.config import TrialConfig
from search.worker.events import Claimed
from search.worker.events import Event
from search.worker.events import Subscriber

__all__ = [
    "ENV_FLUSH",
    "EventDispatcher",
    "FLUSH_AFTER_SIGNAL_S",
    "FLUSH_S",
    "FlushSettingError",
    "flush_seconds",
]

_logger = logging.getLogger(__name__)

ENV_FLUSH = "SEARCH_EVENTS_FLUSH_S"
FLUSH_S = 60.0  # the longest a worker waits for its observers when it leaves
FLUSH_AFTER_SIGNAL_S = 5.0  # ... after SIGTERM / SIGINT (docker stop gives 10 s in all)
MAX_QUEUE = 10_000  # events waiting for a slow subscriber before new ones are dropped
_STOP = object()


class FlushSettingError(ValueError):
    """``$SEARCH_EVENTS_FLUSH_S`` is not a number of seconds (one line, exit 2)."""


def flush_seconds(*, signalled: bool = False) -> float:
    """How long :meth:`EventDispatcher.close` waits: ``$SEARCH_EVENTS_FLUSH_S`` or the default
    (at most :data:`FLUSH_AFTER_SIGNAL_S` after a signal).

    Raises:
        FlushSettingError: The variable is set to something other than a finite number >= 0
            (``Worker.open`` asks first, so a worker never starts with it).
    """
    text = os.environ.get(ENV_FLUSH, "").strip()
    if not text:
        seconds = FLUSH_S
    else:
        try:
            seconds = float(text)
        except ValueError:
            seconds = float("nan")
        if not 0.0 <= seconds < float("inf"):
            raise FlushSettingError(f"${ENV_FLUSH} must be a number of seconds >= 0, not {text!r}")
    return min(seconds, FLUSH_AFTER_SIGNAL_S) if signalled else seconds


def _name(subscriber: Subscriber) -> str:
    return type(subscriber).__qualname__


class EventDispatcher:
    """One worker's subscribers, called in event order on a background thread.

    Args:
        subscribers: The observers, called in this order for each event.
        max_queue: Events that may wait for the thread; beyond, new events are dropped.
    """

    def __init__(self, subscribers: Sequence[Subscriber] = (), *, max_queue: int = MAX_QUEUE):
        self.subscribers = list(subscribers)
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._logged: set[tuple[str, str]] = set()  # (subscriber, kind) failures logged
        self._dropped: set[str] = set()  # kinds whose drop was logged
        self._busy: tuple[str, str, float] | None = None  # (subscriber, kind, since)
        self._guard = threading.Lock()
        self._closed = False

    def wants(self, kind: str) -> bool:
        """Whether some subscriber overrides ``on_<kind>`` (else such events are not made)."""
        method = f"on_{kind}"
        base = getattr(Subscriber, method, None)
        return any(getattr(type(s), method, base) is not base for s in self.subscribers)

    def emit(self, event: Event) -> None:
        """Queue ``event`` for the subscribers; never blocks, never raises."""
        if self._closed or not self.wants(event.kind):
            return
        self._start()
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            if event.kind not in self._dropped:
                self._dropped.add(event.kind)
                _logger.warning(
                    "%d events wait for a slow subscriber (%s): %s events are dropped "
                    "until it catches up",
                    self._queue.maxsize,
                    self._busy_text(),
                    event.kind,
                )

    def trial_attrs(self, event: Claimed) -> dict[str, Any]:
        """The subscribers' synchronous :meth:`Subscriber.trial_attrs`, merged in order."""
        out: dict[str, Any] = {}
        for subscriber in self.subscribers:
            try:
                out.update(subscriber.trial_attrs(event))
            except Exception as exc:  # noqa: BLE001 - an observer never fails a trial
                self._failed(subscriber, "trial_attrs", exc)
        return out

    def training_config(self, event: Claimed, cfg: TrialConfig) -> TrialConfig:
        """Each subscriber's synchronous :meth:`Subscriber.training_config`, in order."""
        for subscriber in self.subscribers:
            try:
                cfg = subscriber.training_config(event, cfg)
            except Exception as exc:  # noqa: BLE001 - an observer never fails a trial
                self._failed(subscriber, "training_config", exc)
        return cfg

    def close(self, timeout: float | None = None) -> bool:
        """Deliver what is queued, waiting at most ``timeout`` s (default :func:`flush_seconds`).

        Returns:
            Whether every event was delivered (False: the rest is left to the daemon thread).
        """
        if self._closed:
            return True
        self._closed = True
        thread = self._thread
        if thread is None:
            return True
        timeout = flush_seconds() if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(_STOP, timeout=max(0.0, timeout))
        except queue.Full:
            pass
        thread.join(max(0.0, deadline - time.monotonic()))
        if not thread.is_alive():
            return True
        _logger.warning(
            "observers not done after %g s (%s, %d events left): the worker leaves them "
            "($%s sets the wait)",
            timeout,
            self._busy_text(),
            self._queue.qsize(),
            ENV_FLUSH,
        )
        return False

    # ------------------------------------------------------------------ the thread

    def _start(self) -> None:
        with self._guard:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="search-events", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is _STOP:
                return
            assert isinstance(event, Event)
            for subscriber in self.subscribers:
                method = getattr(subscriber, f"on_{event.kind}", None)
                if method is None:
                    continue
                self._busy = (_name(subscriber), event.kind, time.monotonic())
                try:
                    method(event)
                except Exception as exc:  # noqa: BLE001 - logged; the next event goes on
                    self._failed(subscriber, event.kind, exc)
                finally:
                    self._busy = None

    def _failed(self, subscriber: Subscriber, kind: str, exc: Exception) -> None:
        key = (_name(subscriber), kind)
        if key in self._logged:
            _logger.debug("subscriber %s failed on %s again: %r", key[0], kind, exc)
            return
        self._logged.add(key)
        _logger.warning(
            "subscriber %s failed on a %s event (logged once; the worker goes on)",
            key[0],
            kind,
            exc_info=exc,
        )

    def _busy_text(self) -> str:
        busy = self._busy
        if busy is None:
            return "none busy"
        name, kind, since = busy
        return f"{name} busy with a {kind} event for {time.monotonic() - since:.0f} s"
