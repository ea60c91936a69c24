"""Real ``search worker`` / ``search run`` processes under faults, on a real database.

Each worker is the real CLI with its real trial child; only the training is replaced by
``tests/fixtures/slow_objective.py`` (the hidden ``--objective`` option), which sleeps and
reports each epoch, so a trial lasts as long as a test needs. Heartbeats every second, a
3-second grace period. PostgreSQL tests use a database of their own, dropped afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from _cli_workers import copies_of
from _cli_workers import group_alive
from _cli_workers import study_trials
from _cli_workers import wait_for
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search.record import attrs
from search.record.counts import spent_count
from search.worker.budget import HANDED_BACK
from storage import create_storage

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "tests" / "fixtures" / "tiny_workers.yaml"
HEARTBEAT_S = 1
GRACE_S = 3


class Proc:
    """A CLI process in its own session (killing its group kills its trial child too)."""

    def __init__(self, args: list[str], tmp: Path, label: str, **env: str) -> None:
        self.out = tmp / f"{label}.out"
        self.err = tmp / f"{label}.err"
        full_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "fixtures")]),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "SEARCH_HEARTBEAT_INTERVAL": str(HEARTBEAT_S),
            "SEARCH_GRACE_PERIOD": str(GRACE_S),
            "SEARCH_TEST_PID_DIR": str(tmp / "children"),
            **env,
        }
        (tmp / "children").mkdir(exist_ok=True)
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "search.cli", *args],
                env=full_env,
                cwd=tmp,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.pid = self.popen.pid

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes started by a test; whatever is left is killed (with its group) at the end."""
    started: list[Proc] = []
    yield started
    for proc in started:
        if proc.popen.poll() is None or group_alive(proc.pid):
            proc.kill_group()


def _cli(
    procs: list[Proc],
    tmp: Path,
    label: str,
    command: str,
    url: str,
    study: str,
    n: int,
    *,
    epochs: int,
    epoch_s: float,
) -> Proc:
    args = [command, "--spec", str(SPEC), "--device", "cpu", "--storage", url]
    args += ["--n-trials", str(n), "--study-name", study]
    args += ["--objective", "slow_objective:train"]
    proc = Proc(args, tmp, label, SEARCH_TEST_EPOCHS=str(epochs), SEARCH_TEST_EPOCH_S=str(epoch_s))
    procs.append(proc)
    return proc


def _running_of(url: str, study: str, proc: Proc) -> FrozenTrial | None:
    for trial in study_trials(url, study):
        worker = str(trial.user_attrs.get(attrs.WORKER, ""))
        if trial.state == TrialState.RUNNING and worker.endswith(f":{proc.pid}"):
            return trial
    return None


def _wait_running(url: str, study: str, proc: Proc, timeout: float = 150) -> FrozenTrial:
    def check() -> FrozenTrial | None:
        assert proc.popen.poll() is None, proc.stderr()
        return _running_of(url, study, proc)

    trial = wait_for(f"a running trial of pid {proc.pid}", check, timeout)
    assert isinstance(trial, FrozenTrial)
    return trial


def _finish(proc: Proc, timeout: float = 150) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"pid {proc.pid} did not exit: {proc.stderr()[-2000:]}") from None


def _children_gone(tmp: Path) -> None:
    """Every training child the objective recorded has exited."""
    for pid_file in (tmp / "children").iterdir():
        pid = int(pid_file.name)
        wait_for(f"training child {pid} to exit", lambda p=pid: not _alive(p), 10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _no_traceback(*procs: Proc) -> None:
    for proc in procs:
        assert "Traceback" not in proc.stderr(), proc.stderr()


def finished_count_of(trials: list[FrozenTrial]) -> int:
    """The study's finished trials as the budget counts them."""
    return spent_count(trials) - sum(t.state == TrialState.RUNNING for t in trials)


def _terminate_backends(pg_url: str, database: str) -> int:
    admin = sqlalchemy.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            rows = conn.execute(
                sqlalchemy.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": database},
            ).all()
        return len(rows)
    finally:
        admin.dispose()


# ------------------------------------------------------------------------------ PostgreSQL


@pytest.mark.postgres
def test_a_paused_worker_drops_its_stale_trial_and_goes_on(
    pg_db: str, tmp_path: Path, procs: list[Proc]
) -> None:
    study = f"pause-{uuid.uuid4().hex[:8]}"
    paused = _cli(procs, tmp_path, "paused", "worker", pg_db, study, 6, epochs=8, epoch_s=0.4)
    other = _cli(procs, tmp_path, "other", "worker", pg_db, study, 6, epochs=8, epoch_s=0.4)
    trial = _wait_running(pg_db, study, paused)
    os.kill(paused.pid, signal.SIGSTOP)  # the worker and its heartbeats; its child runs on
    try:

        def failed() -> bool:
            return any(
                t.number == trial.number and t.state == TrialState.FAIL
                for t in study_trials(pg_db, study)
            )

        wait_for(f"trial {trial.number} to be failed as stale", failed, 60)
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    resumed = datetime.now()
    assert _finish(paused) == 0, paused.stderr()
    assert _finish(other) == 0, other.stderr()
    _no_traceback(paused, other)
    assert (
        f"trial {trial.number} was failed as stale and re-queued elsewhere; dropping its result"
        in paused.stderr()
    )
    trials = study_trials(pg_db, study)
    assert finished_count_of(trials) == 6
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 6
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    copies = copies_of(trials, trial.number)
    assert len(copies) == 1 and copies[0].state == TrialState.COMPLETE
    assert copies[0].params == trial.params
    # The paused worker went on with a next trial after it woke up.
    later = [
        t
        for t in trials
        if str(t.user_attrs.get(attrs.WORKER, "")).endswith(f":{paused.pid}")
        and t.state == TrialState.COMPLETE
        and t.datetime_start is not None
        and t.datetime_start > resumed
    ]
    assert later, "the resumed worker ran no further trial"
    _children_gone(tmp_path)


@pytest.mark.postgres
def test_a_killed_workers_trial_is_requeued_while_survivors_are_busy(
    pg_db: str, tmp_path: Path, procs: list[Proc]
) -> None:
    study = f"busy-{uuid.uuid4().hex[:8]}"
    # Trials of 60 s: without the heartbeat-side check, the dead worker's trial would wait
    # for a survivor's trial to end.
    workers = [
        _cli(procs, tmp_path, f"w{i}", "worker", pg_db, study, 3, epochs=120, epoch_s=0.5)
        for i in range(3)
    ]
    running = [_wait_running(pg_db, study, proc) for proc in workers]
    victim, survivors = workers[0], workers[1:]
    number = running[0].number
    os.killpg(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    victim.wait(10)
    seen: list[FrozenTrial] = []

    def requeued() -> bool:
        seen[:] = study_trials(pg_db, study)
        return bool(copies_of(seen, number))

    wait_for(f"trial {number} to be re-queued", requeued, 60, every=0.1)
    print(f"trial {number} re-queued {time.monotonic() - killed:.1f} s after the kill")
    # Re-queued while the survivors' own (60 s) trials still ran, as seen with the copy.
    busy = {t.number: t.state for t in seen if t.number in {r.number for r in running[1:]}}
    assert busy == {r.number: TrialState.RUNNING for r in running[1:]}, busy
    assert any(
        f"trial {number} had no heartbeat for the grace period: failed and re-queued"
        in proc.stderr()
        for proc in survivors
    )
    # The survivors are still inside their own trials: SIGTERM hands those back.
    assert all(_running_of(pg_db, study, proc) is not None for proc in survivors)
    for proc in survivors:
        os.kill(proc.pid, signal.SIGTERM)
    for proc in survivors:
        assert _finish(proc, 60) == 0, proc.stderr()
    _no_traceback(*survivors)
    trials = study_trials(pg_db, study)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    handed = [t for t in trials if t.user_attrs.get(HANDED_BACK)]
    assert sorted(t.number for t in handed) == sorted(r.number for r in running[1:])
    for proc, trial in zip(survivors, running[1:], strict=True):
        assert f"terminated: trial {trial.number} handed back and re-queued" in proc.stdout()
        assert len(copies_of(trials, trial.number)) == 1
    assert finished_count_of(trials) == 0  # nothing finished, nothing spent twice
    _children_gone(tmp_path)
    # The dashboard tells why the dead worker's trial failed (the survivor that failed it wrote
    # its note).
    from optuna_dashboard._note import get_note_from_system_attrs

    noted = optuna.load_study(study_name=study, storage=pg_db)
    system = noted._storage.get_study_system_attrs(noted._study_id)
    dead = next(t for t in trials if t.number == number)
    note = get_note_from_system_attrs(system, dead._trial_id)["body"]
    assert note.startswith("failed: worker lost (heartbeat stale)"), note


@pytest.mark.postgres
def test_sigterm_idle_poller_exits_0_and_six_sigterms_hand_back_once(
    pg_db: str, tmp_path: Path, procs: list[Proc]
) -> None:
    study = f"term-{uuid.uuid4().hex[:8]}"
    pair = [
        _cli(procs, tmp_path, f"w{i}", "worker", pg_db, study, 1, epochs=120, epoch_s=0.5)
        for i in range(2)
    ]

    def one_running() -> tuple[Proc, FrozenTrial] | None:
        for proc in pair:
            trial = _running_of(pg_db, study, proc)
            if trial is not None:
                return proc, trial
        return None

    found = wait_for("a running trial", one_running, 150)
    assert isinstance(found, tuple)
    busy, trial = found
    idle = pair[1] if busy is pair[0] else pair[0]
    wait_for("the idle worker to poll", lambda: "waiting for the running" in idle.stderr(), 150)
    os.kill(idle.pid, signal.SIGTERM)
    assert _finish(idle, 15) == 0, idle.stderr()
    assert "terminated: no trial was running" in idle.stdout()
    # Six SIGTERMs in 100 ms while the trial trains: handed back exactly once.
    for _ in range(6):
        os.kill(busy.pid, signal.SIGTERM)
        time.sleep(0.02)
    # A supervisor may keep sending: more SIGTERMs until it exits must not kill it either
    # (seen once: a late one after the hand-back met the default handler, exit -15).
    deadline = time.monotonic() + 30
    while busy.popen.poll() is None and time.monotonic() < deadline:
        os.kill(busy.pid, signal.SIGTERM)
        time.sleep(0.05)
    assert _finish(busy, 30) == 0, busy.stderr()
    _no_traceback(idle, busy)
    assert f"terminated: trial {trial.number} handed back and re-queued" in busy.stdout()
    _children_gone(tmp_path)
    trials = study_trials(pg_db, study)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    handed = [t for t in trials if t.user_attrs.get(HANDED_BACK)]
    assert [t.number for t in handed] == [trial.number]
    assert handed[0].state == TrialState.FAIL
    # The dashboard tells why it failed: the worker wrote the handed-back trial's note.
    from optuna_dashboard._note import get_note_from_system_attrs

    noted = optuna.load_study(study_name=study, storage=pg_db)
    system = noted._storage.get_study_system_attrs(noted._study_id)
    note = get_note_from_system_attrs(system, handed[0]._trial_id)["body"]
    assert note.startswith("handed back"), note
    copies = copies_of(trials, trial.number)
    assert len(copies) == 1 and copies[0].state == TrialState.WAITING
    # The budget is exact: a next worker runs the re-queued copy, and that is the one trial.
    last = _cli(procs, tmp_path, "last", "worker", pg_db, study, 1, epochs=1, epoch_s=0.1)
    assert _finish(last) == 0, last.stderr()
    trials = study_trials(pg_db, study)
    assert finished_count_of(trials) == 1
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert [t.number for t in done] == [copies[0].number]
    assert done[0].params == trial.params


@pytest.mark.postgres
def test_terminating_every_connection_twice_loses_nothing(
    pg_db: str, pg_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    study = f"pgterm-{uuid.uuid4().hex[:8]}"
    database = sqlalchemy.engine.make_url(pg_db).database
    assert database is not None
    workers = [
        _cli(procs, tmp_path, f"w{i}", "worker", pg_db, study, 6, epochs=3, epoch_s=0.4)
        for i in range(2)
    ]
    for target in (1, 3):

        def reached(target: int = target) -> bool:
            return finished_count_of(study_trials(pg_db, study)) >= target

        wait_for(f"{target} finished trials", reached, 150)
        assert _terminate_backends(pg_url, database) > 0
    for proc in workers:
        assert _finish(proc) == 0, proc.stderr()
    _no_traceback(*workers)
    trials = study_trials(pg_db, study)
    assert finished_count_of(trials) == 6
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 6


# ---------------------------------------------------------------------------------- SQLite


def test_sigint_on_search_run_hands_the_trial_back_and_says_so(
    tmp_path: Path, procs: list[Proc]
) -> None:
    url = f"sqlite:///{tmp_path}/run.db"
    run = _cli(procs, tmp_path, "run", "run", url, "ctrl-c", 2, epochs=120, epoch_s=0.5)
    trial = _wait_running(url, "ctrl-c", run)
    wait_for("the training child", lambda: any((tmp_path / "children").iterdir()), 60)
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
    assert _finish(run, 30) == 130, run.stderr()
    _no_traceback(run)
    assert f"interrupted: trial {trial.number} handed back and re-queued" in run.stdout()
    _children_gone(tmp_path)
    trials = study_trials(url, "ctrl-c")
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    handed = [t for t in trials if t.user_attrs.get(HANDED_BACK)]
    assert [t.number for t in handed] == [trial.number]
    assert handed[0].user_attrs[attrs.OUTCOME] == attrs.OUTCOME_HANDED_BACK  # not "running"
    copies = copies_of(trials, trial.number)
    assert len(copies) == 1 and copies[0].state == TrialState.WAITING


def test_workers_on_one_sqlite_file_create_the_study_once_and_finish_exactly_n(
    tmp_path: Path, procs: list[Proc]
) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    workers = [
        _cli(procs, tmp_path, f"w{i}", "worker", url, "shared", 5, epochs=2, epoch_s=0.2)
        for i in range(3)
    ]
    for proc in workers:
        assert _finish(proc) == 0, proc.stderr()
    _no_traceback(*workers)
    store = create_storage(url, heartbeat_interval=None)
    assert [s.study_name for s in optuna.get_all_study_summaries(store)] == ["shared"]
    trials = study_trials(url, "shared")
    assert finished_count_of(trials) == 5
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    # One baseline per model was enqueued, once (the spec has one model).
    assert sum("fixed_params" in t.system_attrs for t in trials) == 1
    # Each worker's bar shows the study's count; its text, this worker's own.
    mine = [
        sum(str(t.user_attrs[attrs.WORKER]).endswith(f":{p.pid}") for t in trials) for p in workers
    ]
    for proc, count in zip(workers, mine, strict=True):
        assert "5/5" in proc.stdout(), proc.stdout()
        if count:
            assert f"{count} by this worker" in proc.stdout(), proc.stdout()
