"""Where a run's wall time goes: seconds per phase, from one clock switched between phases.

The training loop enters ``load``, ``tokenise``, ``train``, ``evaluate`` and ``save`` as it runs
(``search.record.attrs.TIMING_PHASES``); the trial's child process lends the loop its clock and
reads it when the run ends, however it ends (complete, pruned, out of memory, failed).

Example:
    >>> clock = PhaseClock()
    >>> clock.enter("load"); clock.enter("train"); clock.enter("load")
    >>> sorted(clock.stop())
    ['load', 'train']
"""

from __future__ import annotations

import time

__all__ = ["PhaseClock"]


class PhaseClock:
    """Wall seconds (``time.perf_counter``) per phase; a phase entered again adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._phase: str | None = None
        self._since = 0.0

    def enter(self, name: str | None) -> None:
        """Close the open phase (add its seconds) and open ``name`` (None: open none)."""
        now = time.perf_counter()
        if self._phase is not None:
            self.seconds[self._phase] = self.seconds.get(self._phase, 0.0) + now - self._since
        self._phase, self._since = name, now

    def stop(self) -> dict[str, float]:
        """Close the open phase; the seconds per phase so far."""
        self.enter(None)
        return dict(self.seconds)
