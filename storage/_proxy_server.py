"""The server side of ``search proxy``: Optuna's gRPC storage service plus ``search.Extras``.

``search.Extras`` (see ``storage._proxy_client``) runs the budget's operations on the proxy's
own ``RDBStorage``. The named lock is held by the proxy for the worker: one waiter per lock
name waits on the database (the others wait in the proxy, holding no connection and at most
``max_waiters`` server threads, so workers waiting for the lock never starve the lock holder's
own calls), and the lock is released when the worker's call ends or after the lease.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

import optuna
from optuna.exceptions import DuplicatedStudyError
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.storages import RDBStorage
from optuna.study import StudyDirection
from optuna.trial import TrialState

from storage._fence import LockLost
from storage._fence import fenced
from storage._grpc import grpc
from storage._lock import lock_timeout
from storage._lock import named_lock
from storage._ops import adopt_orphans_in
from storage._ops import fail_and_enqueue_in
from storage._ops import stale_trial_ids
from storage._proxy_auth import TokenCheck
from storage._proxy_auth import add_port
from storage._proxy_client import SERVICE
from storage._proxy_client import dump
from storage._proxy_client import fence_from_message
from storage._proxy_client import load
from storage._proxy_client import trial_from_text
from storage._proxy_security import ServerSecurity
from storage._rdb import client_token
from storage.compat import add_storage_service

_logger = logging.getLogger(__name__)

DEFAULT_THREADS = 256
_POLL_S = 0.2  # how often a waiter in the proxy checks that its worker is still there

Handler = Callable[[dict[str, Any], grpc.ServicerContext], dict[str, Any]]


class ExtrasService:
    """``search.Extras``: heartbeats, the stale query, fail-and-re-queue, records, locks, and
    the writes that carry a client token (``storage._proxy_client``)."""

    def __init__(
        self, rdb: RDBStorage, *, max_waiters: int, url: str, cached: BaseStorage | None = None
    ) -> None:
        self._rdb = rdb
        # The token writes go through the cache Optuna's service uses, so it knows the trials.
        self._cached = cached if cached is not None else rdb
        self._url = url
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._waiters = threading.BoundedSemaphore(max_waiters)

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's gRPC handler (JSON messages)."""
        unary: dict[str, Handler] = {
            "Hello": self.hello,
            "RecordHeartbeat": self.record_heartbeat,
            "StaleTrialIds": self.stale_trial_ids,
            "AdoptOrphans": self.adopt_orphans,
            "FailAndEnqueue": self.fail_and_enqueue,
            "SetTrialAttrs": self.set_trial_attrs,
            "CreateStudy": self.create_study,
            "CreateTrial": self.create_trial,
            "SetTrialState": self.set_trial_state,
        }
        handlers: dict[str, grpc.RpcMethodHandler] = {
            name: grpc.unary_unary_rpc_method_handler(
                _answered(fn), request_deserializer=load, response_serializer=dump
            )
            for name, fn in unary.items()
        }
        handlers["Hold"] = grpc.unary_stream_rpc_method_handler(
            self.hold, request_deserializer=load, response_serializer=dump
        )
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def hello(self, request: dict[str, Any], context: grpc.ServicerContext) -> dict[str, Any]:
        return {"storage": self._url, "optuna": optuna.__version__}

    def record_heartbeat(
        self, request: dict[str, Any], context: grpc.ServicerContext
    ) -> dict[str, Any]:
        self._rdb.record_heartbeat(int(request["trial_id"]))
        return {}

    def stale_trial_ids(
        self, request: dict[str, Any], context: grpc.ServicerContext
    ) -> dict[str, Any]:
        ids = stale_trial_ids(self._rdb, int(request["study_id"]), float(request["grace"]))
        return {"ids": ids}

    def adopt_orphans(
        self, request: dict[str, Any], context: grpc.ServicerContext
    ) -> dict[str, Any]:
        ids = adopt_orphans_in(self._rdb, int(request["study_id"]), float(request["grace"]))
        return {"ids": ids}

    def fail_and_enqueue(
        self, request: dict[str, Any], context: grpc.ServicerContext
    ) -> dict[str, Any]:
        copy = trial_from_text(request["copy"]) if request.get("copy") else None
        done = fail_and_enqueue_in(
            self._rdb,
            int(request["study_id"]),
            int(request["trial_id"]),
            request.get("user_attrs") or {},
            copy,
            token=request.get("token"),
            retried=bool(request.get("retried")),
        )
        return {"done": done}

    def create_study(
        self, request: dict[str, Any], context: grpc.ServicerContext
    ) -> dict[str, Any]:
        directions = [StudyDirection[name] for name in request["directions"]]
        with _token_of(request):
            study_id = self._cached.create_new_study(directions, str(request["name"]))
        return {"id": study_id}

    def create_trial(
        self, request: dict[str, Any], context: grpc.ServicerContext
    ) -> dict[str, Any]:
        template = trial_from_text(request["template"]) if request.get("template") else None
        with _token_of(request), fenced(fence_from_message(request.get("fence"))):
            trial_id = self._cached.create_new_trial(int(request["study_id"]), template)
        return {"id": trial_id}

    def set_trial_state(
        self, request: dict[str, Any], context: grpc.ServicerContext
    ) -> dict[str, Any]:
        trial_id, state = int(request["trial_id"]), TrialState[request["state"]]
        with _token_of(request), fenced(fence_from_message(request.get("fence"))):
            updated = self._cached.set_trial_state_values(trial_id, state, request.get("values"))
        return {"updated": updated}

    def set_trial_attrs(
        self, request: dict[str, Any], context: grpc.ServicerContext
    ) -> dict[str, Any]:
        set_all = getattr(self._rdb, "set_trial_attrs", None)
        trial_id = int(request["trial_id"])
        user, system = request.get("user") or {}, request.get("system") or {}
        if set_all is not None:
            set_all(trial_id, user, system)
        else:
            for key, value in user.items():
                self._rdb.set_trial_user_attr(trial_id, key, value)
            for key, value in system.items():
                self._rdb.set_trial_system_attr(trial_id, key, value)
        return {}

    def hold(
        self, request: dict[str, Any], context: grpc.ServicerContext
    ) -> Iterator[dict[str, Any]]:
        """Take the lock ``name``, say so, and hold it until the call ends or the lease."""
        name = str(request["name"])
        if not self._waiters.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many lock waiters; retry")
        try:
            with self._guard:
                local = self._locks.setdefault(name, threading.Lock())
            while not local.acquire(timeout=_POLL_S):
                if not context.is_active():
                    return
        finally:
            self._waiters.release()
        try:
            ended = threading.Event()
            if not context.add_callback(ended.set):  # the worker has gone already
                return
            with named_lock(self._rdb, name, holder=_holder(request, context)):
                yield {"held": True}
                if not ended.wait(lock_timeout()):
                    _logger.warning(
                        "lock %s held past its lease ($SEARCH_LOCK_TIMEOUT=%g s): released",
                        name,
                        lock_timeout(),
                    )
        finally:
            local.release()


def _holder(request: dict[str, Any], context: grpc.ServicerContext) -> str:
    """The worker a lock is held for (its ``<pid>@<host>``, else its address), for
    ``pg_stat_activity`` (``storage._lock.holder_label``)."""
    return str(request.get("holder") or context.peer())


def _token_of(request: dict[str, Any]) -> AbstractContextManager[None]:
    """The worker's client token for the write the request asks for (``storage._rdb``)."""
    return client_token(str(request["token"]), retried=bool(request.get("retried")))


def _answered(fn: Handler) -> Handler:
    """``fn`` with Optuna's errors sent as gRPC codes (the client raises them again)."""

    def call(request: dict[str, Any], context: grpc.ServicerContext) -> dict[str, Any]:
        try:
            return fn(request, context)
        except UpdateFinishedTrialError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except KeyError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except DuplicatedStudyError as exc:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc) or "study exists")
        except LockLost as exc:  # storage._fence: the worker's budget lock was taken since
            context.abort(grpc.StatusCode.ABORTED, str(exc))
        raise AssertionError("unreachable")  # context.abort raises

    return call


def make_proxy_server(
    rdb: RDBStorage,
    host: str,
    port: int,
    *,
    threads: int = DEFAULT_THREADS,
    url: str = "",
    security: ServerSecurity | None = None,
) -> grpc.Server:
    """A gRPC server (not started) with Optuna's storage service and ``search.Extras``.

    Optuna's service gets the storage wrapped in its cache (as ``optuna.storages.get_storage``
    does); the extras run on ``rdb`` itself. Lock waiters take at most half the threads. With
    ``security``, the port speaks TLS (client certificates required if it has a client CA) and
    every call must carry its token (``storage._proxy_auth``).

    Raises:
        RuntimeError: The address cannot be bound (in use, or not an address of this host).
    """
    security = security or ServerSecurity()
    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="proxy"),
        interceptors=[TokenCheck(security.token)] if security.token else None,
        options=[("grpc.so_reuseport", 0)],  # a second proxy on a port in use is an error
    )
    cached = optuna.storages.get_storage(rdb)
    add_storage_service(server, cached)
    extras = ExtrasService(rdb, max_waiters=max(1, threads // 2), url=url, cached=cached)
    server.add_generic_rpc_handlers((extras.handler(),))
    bound = add_port(server, f"{host}:{port}", security)
    if bound == 0:
        raise RuntimeError(f"cannot listen on {host}:{port}")
    return server
