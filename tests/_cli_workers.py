"""Real ``search worker`` processes for the multi-process tests, and what to check on their study.

Each worker is the product's CLI (``python -m search.cli worker``) with its stale watcher, trial
record, isolated trial child, skips and stages; only the training is
``tests/fixtures/slow_objective.py`` (the hidden ``--objective`` option), which sleeps
``epoch_s`` per epoch and reports a metric, so a trial takes a second, not minutes. Heartbeats
every second and a 3-second grace period (``$SEARCH_HEARTBEAT_INTERVAL``,
``$SEARCH_GRACE_PERIOD``) unless a test asks for more.

Used by tests/test_workers.py, tests/test_budget.py and tests/test_study_store.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path

import optuna
from _cli import FIXTURES
from _cli import search_env
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search.record import attrs
from search.record.counts import spent_count
from search.record.trial_record import config_of
from search.record.trial_record import outcome_of
from storage import create_storage

SPEC = FIXTURES / "tiny_workers.yaml"  # one model, so on_create enqueues one baseline
HEARTBEAT_S = 1
GRACE_S = 3
# The line each worker prints as it exits (search/cli): its own count of finished trials.
_RAN = re.compile(r"(\d+) trials run by this worker \(stopped by (\w+)\)")


class WorkerProcess:
    """One ``search worker`` process in its own session (killing the group kills its child).

    ``epochs`` x ``epoch_s`` is how long each of its trials trains; ``env`` adds or overrides
    environment variables (e.g. a longer ``SEARCH_GRACE_PERIOD``).
    """

    def __init__(
        self,
        url: str,
        study: str,
        n_trials: int,
        tmp: Path,
        label: str,
        *,
        epochs: int = 1,
        epoch_s: float = 0.2,
        env: dict[str, str] | None = None,
    ) -> None:
        self.label = label
        self.out = tmp / f"{label}.out"
        self.err = tmp / f"{label}.err"
        self.children = tmp / f"{label}.children"  # the objective writes its pid here
        self.children.mkdir()
        args = ["worker", "--spec", str(SPEC), "--device", "cpu", "--storage", url]
        args += ["--n-trials", str(n_trials), "--study-name", study]
        args += ["--objective", "slow_objective:train"]
        full_env = search_env(  # fixtures importable by the trial child too
            {
                "OMP_NUM_THREADS": "1",
                "SEARCH_HEARTBEAT_INTERVAL": str(HEARTBEAT_S),
                "SEARCH_GRACE_PERIOD": str(GRACE_S),
                "SEARCH_TEST_EPOCHS": str(epochs),
                "SEARCH_TEST_EPOCH_S": str(epoch_s),
                "SEARCH_TEST_PID_DIR": str(self.children),
                **(env or {}),
            }
        )
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

    def __repr__(self) -> str:
        return f"<worker {self.label} pid {self.pid}>"

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def training(self) -> bool:
        """Whether a trial child of this worker has started training."""
        return any(self.children.iterdir())

    def kill_group(self) -> None:
        """SIGKILL the worker and its trial child (its process group), as a lost machine."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)

    def finish(self, timeout: float = 180) -> int:
        """Wait for the exit (a generous bound: the failure names a worker that hung)."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self} did not exit: {self.stderr()[-3000:]}") from None

    def assert_exited_cleanly(self) -> None:
        """Exit 0, the budget stopped it, no traceback."""
        assert self.finish() == 0, f"{self}: {self.stderr()[-3000:]}"
        assert "Traceback" not in self.stderr(), self.stderr()
        assert self.stopped_by() == "budget", self.stdout()[-2000:]

    def trials_run(self) -> int:
        """The number of trials this worker says it finished (its last line)."""
        found = _RAN.findall(self.stdout())
        assert found, f"{self} printed no summary: {self.stdout()[-2000:]}"
        return int(found[-1][0])

    def stopped_by(self) -> str | None:
        found = _RAN.findall(self.stdout())
        return found[-1][1] if found else None

    def children_gone(self) -> bool:
        """Every training child this worker started has exited (zombies count as gone)."""
        return not any(_alive(int(p.name)) for p in self.children.iterdir())


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def stop_all(workers: Sequence[WorkerProcess]) -> None:
    """Kill whatever a test left running, trial children and process servers included (a
    failed assertion must not leave workers behind)."""
    for worker in workers:
        if worker.alive() or group_alive(worker.pid):
            worker.kill_group()


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(what: str, check: Callable[[], object], timeout: float, every: float = 0.1) -> object:
    """Poll ``check`` until it returns something truthy; a generous ``timeout`` names ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


_stores: dict[str, optuna.storages.BaseStorage] = {}


def storage_of(url: str) -> optuna.storages.BaseStorage:
    """One storage per URL for the test's reads (no heartbeat), opened on first use."""
    return _stores.get(url) or _stores.setdefault(
        url, create_storage(url, heartbeat_interval=None)
    )


def study_trials(url: str, study: str) -> list[FrozenTrial]:
    """The study's trials as stored now (none while it does not exist yet)."""
    try:
        return optuna.load_study(study_name=study, storage=storage_of(url)).get_trials(
            deepcopy=False
        )
    except KeyError:
        return []


def pid_of(trial: FrozenTrial) -> int | None:
    """The pid of the worker that claimed ``trial`` (its ``worker`` attr is ``host:pid``)."""
    worker = str(trial.user_attrs.get(attrs.WORKER, ""))
    tail = worker.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def running_of(url: str, study: str, worker: WorkerProcess) -> FrozenTrial | None:
    """The trial ``worker`` is running now, if any."""
    for trial in study_trials(url, study):
        if trial.state == TrialState.RUNNING and pid_of(trial) == worker.pid:
            return trial
    return None


def copies_of(trials: Sequence[FrozenTrial], number: int) -> list[FrozenTrial]:
    """The re-queued copies of trial ``number``."""
    return [t for t in trials if number in t.system_attrs.get(attrs.RETRY_HISTORY, ())]


def assert_budget_spent_exactly(
    trials: Sequence[FrozenTrial], budget: int, workers: Sequence[WorkerProcess]
) -> list[FrozenTrial]:
    """The study ends at its budget, each finished trial recorded and claimed by one worker.

    Exactly ``budget`` trials COMPLETE and spend the budget; none is left RUNNING or WAITING;
    no two finished trials share their parameters (no claim was run twice); every finished
    trial carries its record (outcome, config, host) and the pid of one of ``workers``; each
    worker that exited counted exactly the finished trials that name it. Returns the
    finished trials.
    """
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states, states
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(finished) == budget, states
    assert spent_count(trials) == budget, states
    params = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(params)) == budget, "a claim was run twice"
    pids = {w.pid for w in workers}
    for trial in finished:
        assert outcome_of(trial) == attrs.OUTCOME_COMPLETE, trial.user_attrs
        assert trial.user_attrs.get(attrs.OUTCOME) == attrs.OUTCOME_COMPLETE, trial.user_attrs
        assert config_of(trial) is not None, f"trial {trial.number} has no config record"
        assert trial.user_attrs.get(attrs.HOST), trial.user_attrs
        assert pid_of(trial) in pids, trial.user_attrs
    for worker in workers:
        if worker.popen.returncode == 0:
            mine = sum(pid_of(t) == worker.pid for t in finished)
            assert worker.trials_run() == mine, (worker, mine, worker.stdout()[-2000:])
    return finished
