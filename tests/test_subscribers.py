"""Observers are subscribers of a worker's trial events, never on the step nor under the lock.

First the dispatcher alone (order, a failure logged once, a hang bounded, a full queue), the
``--callback`` loader and the one read of the trial list per step (``Worker.step`` in-process,
counted on the storage). Then real ``search worker`` processes on PostgreSQL: one of them
with a subscriber that hangs 30 s on every dashboard-note-like event (and a third worker
killed mid-trial, so that a stale trial is re-queued): no claim waits for it, the hanging
worker leaves within its flush bound, and the budget comes out exact.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from _cli import run_search
from _cli import search_env
from _cli_workers import storage_of
from _cli_workers import study_trials
from _cli_workers import wait_for
from _factories import trial_config
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search.record import attrs
from search.record.counts import budget_lock_name
from search.spec.load import resolve_spec
from search.spec.options import RunOptions
from search.worker.budget import claim
from search.worker.budget import ensure_budget
from search.worker.dispatch import EventDispatcher
from search.worker.events import CallbackError
from search.worker.events import Claimed
from search.worker.events import Closed
from search.worker.events import Event
from search.worker.events import FunctionCallback
from search.worker.events import Reported
from search.worker.events import StepLogged
from search.worker.events import Subscriber
from search.worker.events import Told
from search.worker.events import load_subscriber
from search.worker.isolation import TrialOutcome
from search.worker.trainer import TrainHooks
from search.worker.worker import Worker
from storage import compat
from storage import create_storage
from storage import named_lock

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "tests" / "fixtures" / "tiny_workers.yaml"
STUDY = optuna.create_study()  # the events' study in the dispatcher tests (never read)


# ------------------------------------------------------------------ the dispatcher


class Recorder(Subscriber):
    """Records every event it gets, in order."""

    def __init__(self) -> None:
        self.got: list[tuple[str, int]] = []
        self.done = threading.Event()

    def on_claimed(self, event: Claimed) -> None:
        self.got.append(("claimed", event.number))

    def on_reported(self, event: Reported) -> None:
        self.got.append(("reported", event.number))

    def on_told(self, event: Told) -> None:
        self.got.append(("told", event.number))

    def on_closed(self, event: Closed) -> None:
        self.got.append(("closed", -1))
        self.done.set()


class Raises(Subscriber):
    def training_config(self, event: Claimed, cfg: Any) -> Any:
        raise ValueError("no config")

    def trial_attrs(self, event: Claimed) -> dict[str, Any]:
        raise ValueError("no attrs")

    def on_reported(self, event: Reported) -> None:
        raise RuntimeError("boom")


class Blocks(Subscriber):
    """Blocks on every reported event until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def on_reported(self, event: Reported) -> None:
        self.entered.set()
        self.release.wait(60)


def _claimed(number: int) -> Claimed:
    return Claimed(STUDY, number, number, trial_config(), {}, 1.0)


def _reported(number: int) -> Reported:
    return Reported(STUDY, number, 1, {"ndcg@10": 0.5})


def _told(number: int) -> Told:
    frozen = optuna.trial.create_trial(value=0.5)
    return Told(STUDY, number, number, frozen, TrialOutcome(status="complete"), trial_config())


def test_events_reach_every_subscriber_in_order_and_a_failure_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="search.worker.dispatch")
    recorder = Recorder()
    events = EventDispatcher([Raises(), recorder])
    sent: list[Event] = []
    for number in range(3):
        sent += [_claimed(number), _reported(number), _reported(number), _told(number)]
    for event in sent:
        events.emit(event)
    events.emit(Closed(STUDY, "budget"))
    assert events.close(10)
    assert recorder.got == [(e.kind, e.number) for e in sent] + [("closed", -1)]  # type: ignore[attr-defined]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # six failures of one subscriber on one kind: one warning
    assert "Raises failed on a reported event" in warnings[0].getMessage()
    assert warnings[0].exc_info is not None  # with its traceback
    # The synchronous hooks: a failure is logged once and changes nothing.
    cfg = trial_config()
    for _ in range(2):
        assert events.training_config(_claimed(9), cfg) is cfg
        assert events.trial_attrs(_claimed(9)) == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and "training_config" in warnings[1] and "trial_attrs" in warnings[2]


def test_a_hanging_subscriber_never_blocks_emit_and_close_waits_only_its_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="search.worker.dispatch")
    blocks, recorder = Blocks(), Recorder()
    events = EventDispatcher([blocks, recorder], max_queue=50)
    try:
        events.emit(_reported(0))
        assert blocks.entered.wait(10)  # it hangs on the first event from now on
        started = time.monotonic()
        for number in range(1, 201):  # 150 more than the queue holds
            events.emit(_reported(number))
        emitted = time.monotonic() - started
        assert emitted < 1.0, emitted  # 200 emits, never waiting for the subscriber
        dropped = [r.getMessage() for r in caplog.records]
        assert len(dropped) == 1 and "reported events are dropped" in dropped[0], dropped
        assert "Blocks busy with a reported event" in dropped[0]

        started = time.monotonic()
        assert not events.close(0.5)  # the bound: half a second, then the worker leaves
        assert 0.4 < time.monotonic() - started < 2.0
        left = caplog.records[-1].getMessage()
        assert "observers not done after 0.5 s" in left and "Blocks busy" in left
        events.emit(_reported(999))  # after close: ignored, never an error
    finally:
        blocks.release.set()


def test_only_the_events_some_subscriber_wants_are_made() -> None:
    class Steps(Subscriber):
        def on_step(self, event: StepLogged) -> None:
            pass

    assert not EventDispatcher([Recorder()]).wants("step")
    assert EventDispatcher([Recorder(), Steps()]).wants("step")
    assert EventDispatcher([Recorder()]).wants("told")
    assert not EventDispatcher([]).wants("told")


def test_callbacks_load_as_subscribers() -> None:
    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    try:
        from hang_subscriber import Hang

        assert isinstance(load_subscriber("hang_subscriber:Hang"), Hang)
        function = load_subscriber("hang_subscriber:noted")
        assert isinstance(function, FunctionCallback)
        for bad, why in (
            ("hang_subscriber", "expected MODULE:NAME"),
            ("no_such_module_x:f", "cannot import no_such_module_x"),
            ("hang_subscriber:missing", "is nothing, not a Subscriber"),
            ("hang_subscriber:os", "is module, not a Subscriber"),
        ):
            with pytest.raises(CallbackError) as err:
                load_subscriber(bad)
            assert why in str(err.value) and "\n" not in str(err.value)
    finally:
        sys.path.remove(str(ROOT / "tests" / "fixtures"))


def test_a_bad_callback_is_one_line_and_exit_2_before_any_study(tmp_path: Path) -> None:
    done = run_search(
        "run", "--spec", str(SPEC), "--storage", f"sqlite:///{tmp_path}/c.db",
        "--callback", "hang_subscriber:missing", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--callback 'hang_subscriber:missing'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "c.db").exists()


@pytest.mark.parametrize("value", ["abc", "-1", "inf"])
def test_a_bad_flush_bound_is_one_line_and_exit_2_before_any_study(
    tmp_path: Path, value: str
) -> None:
    done = run_search(
        "run", "--spec", str(SPEC), "--storage", f"sqlite:///{tmp_path}/c.db", cwd=tmp_path,
        env={"SEARCH_EVENTS_FLUSH_S": value},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"$SEARCH_EVENTS_FLUSH_S must be a number of seconds >= 0, not {value!r}" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "c.db").exists()


# ------------------------------------------------------------------ the step, in-process


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The threads that read a study's trial list (``ResilientRDBStorage._get_trials``)."""
    from storage._rdb import ResilientRDBStorage

    seen: list[str] = []
    real = ResilientRDBStorage._get_trials

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ResilientRDBStorage, "_get_trials", counted)
    return seen


@pytest.mark.parametrize("startup", [0, 4], ids=["tpe", "random-startup"])
def test_one_step_reads_the_trial_list_once(
    tmp_path: Path, reads: list[str], startup: int
) -> None:
    """The claim's read under the lock is the step's only one outside training: the stage
    plan, the sampler (TPE's constant liar too), the feasible grid, the preflight and the
    progress count all use it. During training the pruner reads once per report."""
    spec = resolve_spec("ko-retrieval", None)
    sampler = spec.sampler.model_copy(update={"n_startup_trials": startup})
    spec = spec.model_copy(update={"sampler": sampler})
    opts = RunOptions(
        storage_url=f"sqlite:///{tmp_path}/r.db",
        n_trials=10,
        device="cpu",
        objective="slow_objective:train",  # not the real loop: no weights needed here
    )
    pruner_reads: dict[int, int] = {}

    def trainer(cfg: Any, hooks: TrainHooks) -> TrialOutcome:
        metrics = {"ndcg@10": 0.2 + cfg.lr, "mrr@10": 0.1}
        before = len(reads)
        hooks.report(1, metrics)  # the pruner reads the study's completed trials
        pruner_reads[cfg.seed] = len(reads) - before  # seed: the spec's + the trial number
        return TrialOutcome(status="complete", value=metrics["ndcg@10"], metrics=metrics)

    recorder = Recorder()
    worker = Worker.open(spec, opts, subscribers=[recorder], trainer=trainer)
    outside: list[int] = []
    try:
        while True:
            before = len(reads)
            result = worker.step()
            if result.stopped:
                break
            assert result.frozen is not None and result.outcome in ("complete", "skipped")
            during = pruner_reads.get(spec.training.seed + result.frozen.number, 0)
            outside.append(len(reads) - before - during)
    finally:
        worker.close()
    assert len(outside) >= 10 and outside == [1] * len(outside), outside
    assert set(reads) == {"MainThread"}  # none on other threads either (no observer reads)
    assert set(pruner_reads.values()) == {1}
    told = [n for kind, n in recorder.got if kind == "told"]
    assert len(told) == 10  # every trial told to the subscriber, after the tell
    assert recorder.got[-1] == ("closed", -1)


def test_requeued_stale_trials_are_told_after_the_budget_lock(tmp_path: Path) -> None:
    storage = create_storage(f"sqlite:///{tmp_path}/s.db", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage, study_name="stale")
    ensure_budget(study, 3)
    dead = claim(study, 3)  # its worker "dies": one heartbeat, then nothing
    assert dead is not None
    time.sleep(2.5)
    free: list[bool] = []

    def on_requeued(stale: Any) -> None:  # must find the budget lock free
        taker = threading.Thread(target=lambda: _take(storage, study, free))
        taker.start()
        taker.join(10)
        free.append(bool(stale))

    taken = claim(study, 3, on_requeued=on_requeued)
    assert taken is not None
    assert free == [True, True]
    assert [s.number for s in taken.requeued] == [dead.trial.number]
    # The snapshot, read under the lock after the sweep: the stale trial failed, its copy
    # waiting (it is the trial this claim took).
    assert [t.state for t in taken.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert taken.trial.number == taken.trials[1].number


def _take(storage: Any, study: optuna.Study, free: list[bool]) -> None:
    with named_lock(storage, budget_lock_name(study)):
        free.append(True)


# ------------------------------------------------------------------ real workers, PostgreSQL


HEARTBEAT_S = 1
GRACE_S = 3
N = 12


class Proc:
    """A ``search worker`` in its own session (killing its group kills its trial child)."""

    def __init__(self, tmp: Path, label: str, url: str, study: str, *extra: str, **env: str):
        self.err = tmp / f"{label}.err"
        args = ["worker", "--spec", str(SPEC), "--device", "cpu", "--storage", url]
        args += ["--n-trials", str(N), "--study-name", study]
        args += ["--objective", "slow_objective:train", *extra]
        full = search_env(
            {
                "OMP_NUM_THREADS": "1",
                "SEARCH_HEARTBEAT_INTERVAL": str(HEARTBEAT_S),
                "SEARCH_GRACE_PERIOD": str(GRACE_S),
                "SEARCH_TEST_EPOCHS": "2",
                "SEARCH_TEST_EPOCH_S": "0.4",
                **env,
            }
        )
        with open(tmp / f"{label}.out", "w") as out, open(self.err, "w") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "search.cli", *args],
                env=full,
                cwd=tmp,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.pid = self.popen.pid
        self.exited: float | None = None

    def stderr(self) -> str:
        return self.err.read_text()

    def wait(self, timeout: float) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pid {self.pid} did not exit: {self.stderr()[-3000:]}") from None
        self.exited = self.exited or time.time()
        return code

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill()


def _of(trials: list[FrozenTrial], proc: Proc) -> list[FrozenTrial]:
    return [t for t in trials if str(t.user_attrs.get(attrs.WORKER, "")).endswith(f":{proc.pid}")]


def _wait_all(procs: list[Proc], timeout: float) -> None:
    """Wait for every process to exit, noting when each was first seen gone."""
    deadline = time.monotonic() + timeout
    while any(p.exited is None for p in procs):
        for proc in procs:
            if proc.exited is None and proc.popen.poll() is not None:
                proc.exited = time.time()
        if time.monotonic() > deadline:
            late = [p.err.name for p in procs if p.exited is None]
            raise AssertionError(f"{late} did not exit: {procs[-1].stderr()[-3000:]}")
        time.sleep(0.05)


@pytest.mark.postgres
def test_a_hanging_subscriber_delays_no_claim_and_the_budget_is_exact(
    pg_db: str, tmp_path: Path, procs: list[Proc]
) -> None:
    study = f"hang-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "hang.log"
    flush_s = 3
    # A worker that dies mid-trial (SIGKILL, its trial child too): a survivor re-queues its
    # trial as stale, under the budget lock, and tells its observers after releasing it.
    doomed = Proc(tmp_path, "doomed", pg_db, study, SEARCH_TEST_EPOCH_S="60")
    procs.append(doomed)
    wait_for("the doomed worker's trial", lambda: _of(study_trials(pg_db, study), doomed), 240)
    plain = Proc(tmp_path, "plain", pg_db, study)
    hanging = Proc(
        tmp_path, "hanging", pg_db, study, "--callback", "hang_subscriber:Hang",
        SEARCH_TEST_HANG_LOG=str(log), SEARCH_TEST_HANG_S="30",
        SEARCH_EVENTS_FLUSH_S=str(flush_s),
    )  # fmt: skip
    procs += [plain, hanging]
    doomed.kill()
    _wait_all([plain, hanging], 300)
    assert plain.popen.returncode == 0, plain.stderr()
    assert hanging.popen.returncode == 0, hanging.stderr()

    trials = study_trials(pg_db, study)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == N  # exactly the budget
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    stale = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stale) == 1 and _of(stale, doomed), stale  # the killed worker's, re-queued
    copies = [t for t in trials if stale[0].number in t.system_attrs.get(attrs.RETRY_HISTORY, [])]
    assert [t.state for t in copies] == [TrialState.COMPLETE]

    # The subscriber hung while its worker kept claiming: it ran trials after the first hang.
    hangs = [line.split() for line in log.read_text().splitlines()]
    assert hangs, "the hanging subscriber was never called"
    first_hang = float(hangs[0][2])
    mine = _of(trials, hanging)
    starts = [t.datetime_start.timestamp() for t in mine if t.datetime_start is not None]
    assert [s for s in starts if s > first_hang], "no claim after the subscriber hung"

    # No claim waited: from each survivor's trial end to its next claim (datetime_start, set
    # under the budget lock) is under a second for the other worker; the hanging worker's own
    # claims did not wait for its hung observer either (far under its 30 s; a loaded 2-core
    # machine has shown 1.6 s between two trials of one worker, so not the 1 s bound).
    for proc, bound in ((plain, 1.0), (hanging, 5.0)):
        own = sorted(
            (t for t in _of(trials, proc) if t.datetime_start and t.datetime_complete),
            key=lambda t: t.number,
        )
        gaps = [
            (b.datetime_start - a.datetime_complete).total_seconds()  # type: ignore[operator]
            for a, b in zip(own, own[1:], strict=False)
        ]
        print(f"{proc.err.stem}: trials {[t.number for t in own]}, claim gaps {gaps}")
        assert gaps and max(gaps) < bound, (proc.err.name, gaps)

    # The hanging worker left within its flush bound (3 s) after its last trial, not after
    # 30 s per queued event (one hang is 30 s: the rest is the wait for the other worker's
    # last trial, the report and the exit), and said which observer it left behind.
    last = max(t.datetime_complete.timestamp() for t in mine if t.datetime_complete)
    assert hanging.exited is not None and hanging.exited - last < 25
    print(f"hangs: {len(hangs)}; hanging worker exited {hanging.exited - last:.1f} s after")
    assert f"observers not done after {flush_s:g} s" in hanging.stderr()
    assert "Hang busy with a" in hanging.stderr()
    assert "Traceback" not in plain.stderr() + hanging.stderr()
    # Meanwhile the plain worker's own observer wrote each of its trials' dashboard note.
    system = storage_of(pg_db).get_study_system_attrs(
        storage_of(pg_db).get_study_id_from_name(study)
    )
    for trial in _of(trials, plain):
        keys = compat.dashboard_note_keys(compat.trial_id(trial))
        assert keys is not None and keys[1] in system, trial.number
