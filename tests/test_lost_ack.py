"""Writes that survive a lost acknowledgement: the commit lands, its answer never arrives.

A TCP proxy on 127.0.0.1 sits between the storage and PostgreSQL. It forwards the client's
``COMMIT`` (psycopg sends it as a simple Query message) and, when told to, drops the server's
answer and cuts both connections once the server has answered: the transaction is committed,
the client sees a dropped connection and retries. Every retried write must find what its
first attempt did (``storage._rdb``: client tokens) instead of doing it again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from storage import CLIENT_TOKEN
from storage import STATE_TOKEN
from storage import create_storage
from storage import fail_and_enqueue
from storage import make_proxy_server
from storage import study_id
from storage import trial_id

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed"),
]

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
_SSL_REQUEST, _GSSENC_REQUEST = 80877103, 80877104
_WRITES = ("INSERT", "UPDATE", "DELETE")


def _messages(buffer: bytearray) -> Iterator[tuple[bytes, bytes]]:
    """Pop the complete typed messages (type, whole message) at the head of ``buffer``."""
    while len(buffer) >= 5:
        size = struct.unpack("!i", buffer[1:5])[0]
        if len(buffer) < 1 + size:
            return
        message = bytes(buffer[: 1 + size])
        del buffer[: 1 + size]
        yield message[:1], message


def _statement(kind: bytes, body: bytes, prepared: dict[bytes, str]) -> str | None:
    """The SQL a frontend message runs: Query, Parse (remembered by name), Bind of a name."""
    if kind == b"Q":
        return body.rstrip(b"\0").decode(errors="replace")
    if kind == b"P":
        name, query = body.split(b"\0")[:2]
        prepared[name] = query.decode(errors="replace")
        return prepared[name]
    if kind == b"B":
        statement = body.split(b"\0")[1]
        return prepared.get(statement) if statement else None  # unnamed: its Parse counted
    return None


class CommitCutter:
    """A proxy to PostgreSQL that loses the answer of the commits ``policy`` picks.

    ``policy(statements)`` sees the SQL of the transaction a COMMIT ends; True: the COMMIT
    goes to the server, the server's answer (up to ReadyForQuery) is dropped, and both sides
    are closed. SSL and GSS encryption requests are refused by the proxy, so libpq talks in
    the clear and the stream can be read.
    """

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.policy: Callable[[list[str]], bool] = lambda statements: False
        self.cut: list[list[str]] = []  # the transactions whose answer was lost
        self.commits = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def cut_next(self, n: int = 1) -> None:
        """Lose the answer of the next ``n`` commits of a write (reads commit too)."""
        left = [n]

        def policy(statements: list[str]) -> bool:
            writes = any(s.lstrip().upper().startswith(_WRITES) for s in statements)
            if left[0] <= 0 or not writes:
                return False
            left[0] -= 1
            return True

        self.policy = policy

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for sock in self._sockets:
                sock.close()
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(self.upstream, timeout=10)
            server.settimeout(None)
            for sock in (client, server):  # no Nagle delay on the many small messages
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, server]
            state = {"cutting": False}
            for target in (self._client_to_server, self._server_to_client):
                threading.Thread(target=target, args=(client, server, state), daemon=True).start()

    def _client_to_server(
        self, client: socket.socket, server: socket.socket, state: dict[str, bool]
    ) -> None:
        prepared: dict[bytes, str] = {}
        statements: list[str] = []
        buffer = bytearray()
        started = False
        try:
            while chunk := client.recv(65536):
                buffer += chunk
                while not started and len(buffer) >= 8:  # startup: messages without a type
                    size, code = struct.unpack("!ii", buffer[:8])
                    if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                        del buffer[:8]
                        client.sendall(b"N")  # no encryption: the stream stays readable
                    elif len(buffer) >= size:
                        server.sendall(bytes(buffer[:size]))
                        del buffer[:size]
                        started = True
                    else:
                        break
                out = bytearray()
                for kind, message in _messages(buffer) if started else ():
                    sql = _statement(kind, message[5:], prepared)
                    if sql is not None and sql.strip().rstrip(";").upper() == "COMMIT":
                        with self._lock:
                            self.commits += 1
                            if self.policy(statements):
                                state["cutting"] = True  # before the server can answer
                                self.cut.append(statements)
                        statements = []
                    elif sql is not None:
                        statements.append(sql)
                    out += message
                if out:
                    server.sendall(out)
        except OSError:
            pass
        finally:
            if not state["cutting"]:
                _close(client, server)

    def _server_to_client(
        self, client: socket.socket, server: socket.socket, state: dict[str, bool]
    ) -> None:
        buffer = bytearray()
        try:
            while chunk := server.recv(65536):
                buffer += chunk
                out = bytearray()
                for kind, message in _messages(buffer):
                    if not state["cutting"]:
                        out += message
                    elif kind == b"Z":  # the server has answered the COMMIT: it is durable
                        return
                if out:
                    client.sendall(out)
        except OSError:
            pass
        finally:
            _close(client, server)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


@pytest.fixture
def cutter(pg_url: str) -> Iterator[CommitCutter]:
    url = make_url(pg_url)
    proxy = CommitCutter(url.host or "127.0.0.1", url.port or 5432)
    try:
        yield proxy
    finally:
        proxy.close()


def _via(pg_url: str, proxy: CommitCutter) -> str:
    url = make_url(pg_url).set(host="127.0.0.1", port=proxy.port)
    return url.render_as_string(hide_password=False)


def _found_by_token(caplog: pytest.LogCaptureFixture) -> bool:
    return any("had committed" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ unit level


def test_a_trial_is_created_once_when_its_commit_answer_is_lost(
    pg_url: str, cutter: CommitCutter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="storage")
    name = f"ack-create-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=create_storage(_via(pg_url, cutter)))
    cutter.cut_next()
    trial = study.ask()  # Optuna's cache -> _create_new_trial
    assert len(cutter.cut) == 1 and any("INSERT INTO trials" in s for s in cutter.cut[0])
    assert _found_by_token(caplog)
    cutter.cut_next()
    study.enqueue_trial({"x": 1.0})  # a template trial: WAITING
    assert len(cutter.cut) == 2
    direct = optuna.load_study(study_name=name, storage=create_storage(pg_url))
    trials = direct.get_trials()
    assert [t.state for t in trials] == [TrialState.RUNNING, TrialState.WAITING]
    assert trial_id(trials[0]) == trial_id(trial) and trials[0].number == 0 == trial.number
    tokens = [t.system_attrs[CLIENT_TOKEN] for t in trials]
    assert len(set(tokens)) == 2


def test_a_state_change_is_done_once_when_its_commit_answer_is_lost(
    pg_url: str, cutter: CommitCutter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="storage")
    name = f"ack-state-{uuid.uuid4().hex[:8]}"
    store = create_storage(_via(pg_url, cutter), heartbeat_interval=None)
    study = optuna.create_study(study_name=name, storage=store)
    trial = study.ask()
    cutter.cut_next()
    study.tell(trial, 0.75)  # would raise UpdateFinishedTrialError on a blind retry
    assert len(cutter.cut) == 1 and _found_by_token(caplog)

    study.enqueue_trial({"x": 1.0})
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]
    cutter.cut_next()  # taking a WAITING trial: a blind retry would answer "taken by another"
    assert store.set_trial_state_values(trial_id(waiting), TrialState.RUNNING) is True
    assert len(cutter.cut) == 2

    direct = optuna.load_study(study_name=name, storage=create_storage(pg_url))
    done, taken = direct.get_trials()
    assert done.state == TrialState.COMPLETE and done.values == [0.75]
    assert taken.state == TrialState.RUNNING
    assert done.system_attrs[STATE_TOKEN] != taken.system_attrs[STATE_TOKEN]


def test_fail_and_enqueue_is_done_once_when_its_commit_answer_is_lost(
    pg_url: str, cutter: CommitCutter
) -> None:
    name = f"ack-fail-{uuid.uuid4().hex[:8]}"
    store = create_storage(_via(pg_url, cutter), heartbeat_interval=None)
    study = optuna.create_study(study_name=name, storage=store)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    frozen = store.get_trial(trial_id(trial))
    copy = optuna.trial.create_trial(
        state=TrialState.WAITING,
        params=frozen.params,
        distributions=frozen.distributions,
        system_attrs={**frozen.system_attrs, "retry_history": [frozen.number]},
    )
    cutter.cut_next()
    assert fail_and_enqueue(store, study_id(study), trial_id(trial), {"why": "x"}, copy) is True
    assert len(cutter.cut) == 1
    trials = optuna.load_study(study_name=name, storage=create_storage(pg_url)).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]  # one copy
    assert trials[0].user_attrs["why"] == "x" and trials[1].params == frozen.params
    assert trials[1].system_attrs[CLIENT_TOKEN] != trials[0].system_attrs[CLIENT_TOKEN]
    assert STATE_TOKEN not in trials[1].system_attrs  # not copied from the failed trial


def test_a_study_is_created_and_deleted_once_when_the_answer_is_lost(
    pg_url: str, cutter: CommitCutter
) -> None:
    store = create_storage(_via(pg_url, cutter), heartbeat_interval=None)
    direct = create_storage(pg_url, heartbeat_interval=None)
    name = f"ack-study-{uuid.uuid4().hex[:8]}"
    cutter.cut_next()
    study = optuna.create_study(study_name=name, storage=store)  # no DuplicatedStudyError
    assert len(cutter.cut) == 1
    before = {s.study_name for s in direct.get_all_studies()}
    cutter.cut_next()
    unnamed = store.create_new_study([optuna.study.StudyDirection.MINIMIZE])
    after = {s.study_name for s in direct.get_all_studies()}
    assert len(after - before) == 1 and len(cutter.cut) == 2
    cutter.cut_next()
    store.delete_study(unnamed)  # a blind retry would find no such study: KeyError
    cutter.cut_next()
    optuna.delete_study(study_name=name, storage=store)
    assert len(cutter.cut) == 4
    left = {s.study_name for s in direct.get_all_studies()}
    assert name not in left and not (after - before) & left
    assert study.study_name == name


# ------------------------------------------------------------------ through search proxy


class _LostAnswer(grpc.RpcError):
    """The proxy did the call; its answer never came back (as gRPC reports a dropped link)."""

    __module__ = "grpc"  # storage.classify: gRPC's UNAVAILABLE is an outage

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def search_proxy(pg_url: str, cutter: CommitCutter) -> Iterator[str]:
    """``search proxy`` in this process, its database reached through the cutter."""
    rdb = create_storage(_via(pg_url, cutter), heartbeat_interval=None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = make_proxy_server(rdb, "127.0.0.1", port, threads=16)  # type: ignore[arg-type]
    server.start()
    try:
        yield f"grpc://127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_writes_through_search_proxy_survive_a_lost_commit_answer_and_a_lost_reply(
    pg_url: str, cutter: CommitCutter, search_proxy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from storage._proxy_client import ProxyStorage

    lose = {"CreateStudy", "CreateTrial", "SetTrialState", "FailAndEnqueue"}
    lost: list[str] = []
    call = ProxyStorage._call

    def lossy(self: ProxyStorage, method: str, request: Any, **kwargs: Any) -> dict[str, Any]:
        reply = call(self, method, request, **kwargs)
        if method in lose:  # the first answer of each kind is lost on the way back
            lose.discard(method)
            lost.append(method)
            raise _LostAnswer()
        return reply

    store = create_storage(search_proxy, heartbeat_interval=None)
    monkeypatch.setattr(ProxyStorage, "_call", lossy)
    name = f"ack-proxy-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=store)
    cutter.cut_next()  # and the proxy's own commit answer, on the database side
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    assert len(cutter.cut) == 1
    study.enqueue_trial({"x": 0.5})
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]
    assert store.set_trial_state_values(trial_id(waiting), TrialState.RUNNING) is True
    study.tell(waiting.number, 0.5)
    frozen = store.get_trial(trial_id(trial))
    copy = optuna.trial.create_trial(
        state=TrialState.WAITING, params=frozen.params, distributions=frozen.distributions
    )
    assert fail_and_enqueue(store, study_id(study), trial_id(trial), {}, copy) is True
    assert sorted(lost) == sorted(
        ["CreateStudy", "CreateTrial", "SetTrialState", "FailAndEnqueue"]
    )

    direct = create_storage(pg_url, heartbeat_interval=None)
    assert [s.study_name for s in direct.get_all_studies()].count(name) == 1
    trials = optuna.load_study(study_name=name, storage=direct).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.WAITING]
    assert trials[1].values == [0.5]
    assert len({t.system_attrs[CLIENT_TOKEN] for t in trials}) == 3


# ------------------------------------------------------------------ system level


def _touches_trials(statements: list[str]) -> str | None:
    """``create`` or ``state`` for a transaction that creates a trial or changes one's state."""
    text = " ".join(statements)
    if "INSERT INTO trials " in text:
        return "create"
    if "UPDATE trials SET" in text and "state=" in text:
        return "state"
    return None


def test_two_workers_spend_an_exact_budget_through_lost_commit_answers(
    pg_url: str, cutter: CommitCutter, tmp_path: Path
) -> None:
    n = 4
    seen = {"create": 0, "state": 0}

    def every_other_trial_write(statements: list[str]) -> bool:
        kind = _touches_trials(statements)
        if kind is None or len(cutter.cut) >= 6:
            return False
        seen[kind] += 1
        return seen[kind] % 2 == 1  # the 1st, 3rd, 5th ... creation and state change

    name = f"ack-workers-{uuid.uuid4().hex[:8]}"
    url = _via(pg_url, cutter)
    cutter.policy = every_other_trial_write
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(FIXTURES), str(ROOT)]),
        "SEARCH_CACHE": str(tmp_path / "cache"),
    }
    env.pop("SEARCH_STORAGE", None)
    args = [
        *("--spec", str(FIXTURES / "tiny_workers.yaml")),
        *("--objective", "storage_objective:train"),
        *("--n-trials", str(n), "--study-name", name, "--device", "cpu", "--storage", url),
    ]
    workers = []
    for i in range(2):
        cwd = tmp_path / f"w{i}"
        cwd.mkdir()
        workers.append(
            subprocess.Popen(
                [sys.executable, "-m", "search.cli", "worker", *args],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [proc.communicate(timeout=120)[0] for proc in workers]
    for proc, out in zip(workers, outputs, strict=True):
        assert proc.returncode == 0, out
        assert "Traceback" not in out, out
    kinds = [_touches_trials(statements) for statements in cutter.cut]
    assert kinds.count("create") >= 2 and kinds.count("state") >= 2, kinds

    trials = optuna.load_study(study_name=name, storage=create_storage(pg_url)).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * n  # exact; none re-failed
    assert len({t.system_attrs[CLIENT_TOKEN] for t in trials}) == n  # no duplicate trial
    claims = [t.system_attrs[STATE_TOKEN] for t in trials]
    assert len(set(claims)) == n  # no two trials share a claim (or a state change)
    ran = sum(int(out.split(" trials run by this worker")[0].split()[-1]) for out in outputs)
    assert ran == n, json.dumps(outputs)[-2000:]
