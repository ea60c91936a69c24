"""``grpc://host:port``: a worker's storage through ``search proxy`` (Optuna's gRPC proxy).

Optuna's ``GrpcStorageProxy`` carries the storage API (studies, trials, attributes). What the
budget rule needs besides -- heartbeats, the stale-trial query, the one-transaction fail and
re-queue, the orphan adoption, one-transaction trial records and the study's named lock -- has
no Optuna RPC: ``search proxy`` serves them as a second gRPC service (``search.Extras``, JSON
messages) on the same port, and runs them on its own database connection
(``storage._proxy_server``). The named lock is a server-streaming call held open while the
lock is held: the proxy takes the lock (a PostgreSQL advisory lock, so workers on other
proxies or straight on the database are excluded too) and releases it when the call ends --
the worker leaves the block, dies (its connection closes), or holds it past the lease
(``$SEARCH_LOCK_TIMEOUT``, as for a direct worker).

The channel speaks TLS and sends the proxy's token when ``$SEARCH_PROXY_TLS_CA`` /
``$SEARCH_PROXY_TOKEN_FILE`` name their files (``storage._proxy_security``).

Writes are retried while the proxy is away, and an answer lost on the way back must not make a
retry write twice: trial and study creation and trial state changes go through
``search.Extras`` too, carrying the call's client token (``storage._rdb``: the proxy's database
writes it in the same transaction and a retry finds it); ``delete_study`` retried finds the
study gone and is done. Optuna's own RPCs carry the idempotent rest (reads, upserts).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import random
import socket
import time
import uuid
import warnings
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any
from typing import TypeVar

from optuna.exceptions import DuplicatedStudyError
from optuna.exceptions import ExperimentalWarning
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import GrpcStorageProxy
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from storage._error import StorageError
from storage._error import StorageUnreachable
from storage._fence import Fence
from storage._fence import LockLost
from storage._fence import current_fence
from storage._grpc import grpc
from storage._proxy_auth import client_channel
from storage._proxy_security import ENV_TLS_CA
from storage._proxy_security import ENV_TOKEN_FILE
from storage._proxy_security import client_security
from storage._rdb import RETRIED_METHODS
from storage._retry import call_with_retry
from storage._retry import retrying
from storage._url import proxy_address
from storage.compat import BaseHeartbeat
from storage.compat import default_study_name
from storage.compat import proxy_channel
from storage.compat import trial_from_bytes
from storage.compat import trial_to_bytes
from storage.compat import use_proxy_channel

R = TypeVar("R")

SERVICE = "search.Extras"
# A lock call refused because the proxy has too many waiters is tried again after this long.
_BUSY_RETRY_S = (0.02, 0.2)


def dump(message: Mapping[str, Any]) -> bytes:
    """A JSON message of the ``search.Extras`` service."""
    return json.dumps(message).encode()


def load(data: bytes) -> dict[str, Any]:
    """Read a JSON message of the ``search.Extras`` service."""
    value = json.loads(data or b"{}")
    return value if isinstance(value, dict) else {}


def fence_message(fence: Fence | None) -> dict[str, Any] | None:
    """The claim's fence (``storage._fence``) as a JSON message, for the proxy to check."""
    return None if fence is None else {"study_id": fence.study_id, "token": fence.token}


def fence_from_message(message: Any) -> Fence | None:
    """The fence written by :func:`fence_message`."""
    if not isinstance(message, dict):
        return None
    return Fence(int(message["study_id"]), str(message["token"]))


def trial_to_text(trial: FrozenTrial) -> str:
    """A trial as text, by Optuna's own gRPC message."""
    return base64.b64encode(trial_to_bytes(trial)).decode()


def trial_from_text(text: str) -> FrozenTrial:
    """The trial written by :func:`trial_to_text`."""
    return trial_from_bytes(base64.b64decode(text))


class ProxyStorage(GrpcStorageProxy, BaseHeartbeat):
    """Optuna's gRPC proxy client with heartbeats and the budget's operations (module doc).

    Args:
        url: ``grpc://host:port``.
        heartbeat_interval: Seconds between heartbeats; ``None`` disables them.
        grace_period: Seconds without a heartbeat after which a trial is stale (default
            twice the interval).
        max_retry: How many times a stale trial is re-queued.
        timeout: Seconds to wait for the proxy to answer at first.
    """

    checks_fences = True  # the proxy checks the claim's fence (storage._fence) for us

    def __init__(
        self,
        url: str,
        *,
        heartbeat_interval: int | None,
        grace_period: int | None,
        max_retry: int,
        timeout: float,
    ) -> None:
        host, port = proxy_address(url)
        self.security = client_security()  # before any channel: a bad file is one line
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            super().__init__(host=host, port=port)
            self._callback = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.url = url
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.max_wait = 120.0
        use_proxy_channel(self, client_channel(host, port, self.security, wait_s=self.max_wait))
        try:
            self.wait_server_ready(timeout=timeout)
            self.server = self._call("Hello", {}, timeout=timeout)
        except (ConnectionError, grpc.RpcError) as exc:
            why = self._why_not_ready(exc)
            self.close()
            raise _not_served(url, exc, timeout, why, tls=self.security.tls) from None

    def wait_server_ready(self, timeout: float | None = None) -> None:
        """Wait until the proxy answers on this client's channel (TLS, token), or raise
        ``ConnectionError`` after ``timeout`` seconds."""
        try:
            grpc.channel_ready_future(proxy_channel(self)).result(timeout=timeout)
        except grpc.FutureTimeoutError as exc:
            raise ConnectionError("gRPC connection timeout") from exc

    def _why_not_ready(self, exc: Exception) -> str:
        """A channel that never got ready: the reason one call on a fresh channel gives (a
        failed TLS handshake says so); empty if none."""
        if not isinstance(exc, ConnectionError):
            return ""
        host, port = proxy_address(self.url)
        with client_channel(host, port, self.security) as channel:
            hello = channel.unary_unary(f"/{SERVICE}/Hello", request_serializer=dump)
            try:
                hello({}, timeout=2.0)
            except grpc.RpcError as failed:
                return str(failed.details() or "")
        return ""

    def __setstate__(self, state: dict[str, Any]) -> None:
        GrpcStorageProxy.__setstate__(self, state)
        host, port = proxy_address(self.url)
        use_proxy_channel(self, client_channel(host, port, self.security, wait_s=self.max_wait))

    def _call(self, method: str, request: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        call = proxy_channel(self).unary_unary(
            f"/{SERVICE}/{method}", request_serializer=dump, response_deserializer=load
        )
        try:
            return call(request, **kwargs)  # type: ignore[no-any-return]
        except grpc.RpcError as exc:  # Optuna's errors, as the proxy sent them
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise UpdateFinishedTrialError(exc.details()) from None
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise KeyError(exc.details()) from None
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                raise DuplicatedStudyError(exc.details()) from None
            if exc.code() == grpc.StatusCode.ABORTED:  # storage._fence: the lock was lost
                raise LockLost(exc.details()) from None
            raise

    def _once(self, what: str, attempt: Callable[[bool], R]) -> R:
        """``attempt(retried)``, again (``retried=True``) while the proxy is away."""
        tries = itertools.count()
        return call_with_retry(lambda: attempt(next(tries) > 0), max_wait=self.max_wait, what=what)

    # Writes made idempotent by a client token (module docstring)
    def create_new_study(
        self, directions: Sequence[StudyDirection], study_name: str | None = None
    ) -> int:
        """Optuna's ``create_new_study``, exactly once (``storage._rdb``)."""
        request = {
            "directions": [d.name for d in directions],
            "name": study_name if study_name is not None else default_study_name(),
            "token": uuid.uuid4().hex,
        }
        return self._once(
            "create_new_study",
            lambda retried: int(self._call("CreateStudy", {**request, "retried": retried})["id"]),
        )

    def delete_study(self, study_id: int) -> None:
        """Optuna's ``delete_study``; a retry that finds the study gone is done."""

        def attempt(retried: bool) -> None:
            try:
                GrpcStorageProxy.delete_study(self, study_id)
            except KeyError:
                if not retried:
                    raise

        self._once("delete_study", attempt)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        """Optuna's ``create_new_trial``, exactly once (``storage._rdb``)."""
        request = {
            "study_id": study_id,
            "template": trial_to_text(template_trial) if template_trial is not None else None,
            "token": uuid.uuid4().hex,
            "fence": fence_message(current_fence()),
        }
        return self._once(
            "create_new_trial",
            lambda retried: int(self._call("CreateTrial", {**request, "retried": retried})["id"]),
        )

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        """Optuna's ``set_trial_state_values``, exactly once (``storage._rdb``)."""
        request = {
            "trial_id": trial_id,
            "state": state.name,
            "values": list(values) if values is not None else None,
            "token": uuid.uuid4().hex,
            "fence": fence_message(current_fence()),
        }
        return self._once(
            "set_trial_state_values",
            lambda retried: bool(
                self._call("SetTrialState", {**request, "retried": retried})["updated"]
            ),
        )

    @property
    def grace(self) -> float:
        """The grace period in seconds (twice the interval when not set)."""
        if self.grace_period is not None:
            return float(self.grace_period)
        return 2.0 * float(self.heartbeat_interval or 0)

    # BaseHeartbeat
    def record_heartbeat(self, trial_id: int) -> None:
        self._call("RecordHeartbeat", {"trial_id": trial_id})

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        reply = self._call("StaleTrialIds", {"study_id": study_id, "grace": self.grace})
        return [int(i) for i in reply["ids"]]

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> RetryHeartbeatStaleTrialCallback:
        return self._callback

    # The budget's operations
    def adopt_orphans(self, study_id: int) -> list[int]:
        """``storage.adopt_orphans`` run by the proxy (with this worker's grace period)."""
        reply = self._call("AdoptOrphans", {"study_id": study_id, "grace": self.grace})
        return [int(i) for i in reply["ids"]]

    def fail_and_enqueue(
        self,
        study_id: int,
        trial_id: int,
        user_attrs: Mapping[str, Any],
        copy: FrozenTrial | None,
        *,
        token: str | None = None,
        retried: bool = False,
    ) -> bool:
        """``storage._ops.fail_and_enqueue_in`` run by the proxy: one transaction.

        Not retried here: ``storage._ops.fail_and_enqueue`` retries it with one token.
        """
        request = {
            "study_id": study_id,
            "trial_id": trial_id,
            "user_attrs": dict(user_attrs),
            "copy": trial_to_text(copy) if copy is not None else None,
            "token": token or uuid.uuid4().hex,
            "retried": retried,
        }
        return bool(self._call("FailAndEnqueue", request)["done"])

    def set_trial_attrs(
        self, trial_id: int, user: Mapping[str, Any], system: Mapping[str, Any]
    ) -> None:
        """Set a trial's user and system attributes in one transaction."""
        self._call("SetTrialAttrs", {"trial_id": trial_id, "user": user, "system": system})

    def set_trial_user_attrs(self, trial_id: int, values: Mapping[str, Any]) -> None:
        """Set many user attributes of a trial in one transaction."""
        self.set_trial_attrs(trial_id, values, {})

    @contextmanager
    def hold_lock(self, name: str) -> Iterator[None]:
        """Hold the named lock (on the proxy's database) while the block runs."""
        hold = proxy_channel(self).unary_stream(
            f"/{SERVICE}/Hold", request_serializer=dump, response_deserializer=load
        )

        holder = f"{os.getpid()}@{socket.gethostname()}"  # names the proxy's lock connection

        def acquire() -> Any:
            while True:
                call = hold({"name": name, "holder": holder})
                try:
                    next(call)
                    return call
                except grpc.RpcError as exc:
                    call.cancel()
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                except StopIteration:  # the proxy stopped before it gave the lock
                    call.cancel()
                    ended = f"the proxy {self.url} ended the lock call {name}"
                    raise StorageError(ended) from None
                time.sleep(random.uniform(*_BUSY_RETRY_S))

        call = call_with_retry(acquire, max_wait=self.max_wait, what=f"lock {name}")
        try:
            yield
        finally:
            call.cancel()  # the proxy releases the lock


def _not_served(url: str, exc: Exception, timeout: float, why: str, *, tls: bool) -> StorageError:
    """The one-line error for a proxy that did not answer ``Hello``."""
    code = exc.code() if isinstance(exc, grpc.RpcError) else None
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return StorageError(
            f"{url} is a plain Optuna proxy, not `search proxy`: the budget lock and "
            f"heartbeats need `search proxy --storage URL`"
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return StorageError(
            f"the storage proxy {url} refused this client: no valid token "
            f"(${ENV_TOKEN_FILE} names the file with the proxy's token)"
        )
    if "handshake" in why.lower() or "ssl" in why.lower():
        return StorageError(
            f"cannot reach the storage proxy {url}: the TLS handshake failed (${ENV_TLS_CA} "
            f"must name the CA of the proxy's certificate): {why.splitlines()[0][-300:]}"
        )
    if "socket closed" in why.lower():  # the proxy hung up: TLS it did not get, or no cert
        needs = (
            "a client certificate ($SEARCH_PROXY_TLS_CLIENT_CERT and _KEY)"
            if tls
            else f"TLS (${ENV_TLS_CA} names the CA of its certificate)"
        )
        return StorageError(
            f"cannot reach the storage proxy {url}: it closed the connection; it may need {needs}"
        )
    return StorageUnreachable(
        f"cannot reach the storage proxy {url} within {timeout:g} s "
        f"($SEARCH_CONNECT_TIMEOUT): is `search proxy` running there?"
    )


# Optuna's storage calls and the extras wait while the proxy is away (restarting, or not
# reachable for a moment), as a worker straight on the database waits for it
# (``storage._rdb``): a call waits on the channel until the proxy is back (``_proxy_auth``:
# ``wait_for_ready``, up to ``max_wait``), and one whose connection broke mid-call (gRPC
# UNAVAILABLE) is retried with backoff. The writes with a token retry on their own (``_once``),
# and so does fail_and_enqueue's caller.
_RETRIED = [
    name
    for name in (*RETRIED_METHODS, "adopt_orphans", "set_trial_attrs")
    if name in dir(ProxyStorage) and name not in ("_create_new_trial", "_set_trial_param")
]
for _name in _RETRIED:
    setattr(ProxyStorage, _name, retrying("max_wait")(getattr(ProxyStorage, _name)))
