"""``search proxy``: Optuna's gRPC storage proxy in front of the study database.

Many workers (``--storage grpc://host:port``) talk to one proxy, which holds the database
connections (one pool, not one per worker) and Optuna's trial cache. Besides Optuna's storage
service it serves what the budget rule needs and Optuna's API lacks (heartbeats, the stale
query, the fail-and-re-queue transaction, the study's lock: ``storage._proxy_client``).
The proxy has no authentication and no TLS: listen on loopback or a private network only.
"""

from __future__ import annotations

import signal
import socket
import threading
from types import FrameType

import optuna

from storage import StorageError
from storage import create_storage
from storage import is_proxy_url
from storage import make_proxy_server  # imports grpc only when called
from storage import redact_url

DEFAULT_PORT = 13000
# The proxy's own pool: it serves every worker, so more than one worker's 4 + 4.
POOL = (8, 8)
STOP_GRACE_S = 5.0  # calls in flight may finish this long after SIGTERM


class ProxyError(StorageError):
    """The proxy cannot start (a proxy URL as its storage, an address it cannot bind)."""


def serve(url: str, *, host: str, port: int, threads: int) -> str:
    """Serve ``url`` on ``host:port`` until SIGTERM or SIGINT; return the signal's name.

    Args:
        url: The database (``postgresql://...``, ``sqlite:///...``), already resolved.
        host: Address to listen on.
        port: Port to listen on.
        threads: Server threads (half of them at most wait for locks).
    """
    if is_proxy_url(url):
        raise ProxyError(f"--storage {url}: the proxy needs the database's URL, not a proxy's")
    _check_address(host, port)  # before gRPC, which logs its own multi-line bind error
    shown = redact_url(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study created
    storage = create_storage(url, heartbeat_interval=None, pool=POOL)
    try:
        server = make_proxy_server(storage, host, port, threads=threads, url=shown)  # type: ignore[arg-type]
    except RuntimeError:
        raise ProxyError(
            f"--host {host} --port {port}: cannot listen there (port in use, or not an "
            f"address of this host)"
        ) from None
    stopped = threading.Event()
    caught: list[str] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        caught.append(signal.Signals(signum).name)
        stopped.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        print(f"search proxy: {shown} on grpc://{host}:{port}", flush=True)
        stopped.wait()
    finally:
        server.stop(STOP_GRACE_S).wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        engine = getattr(storage, "engine", None)
        if engine is not None:
            engine.dispose()
    return caught[0] if caught else "stop"


def _check_address(host: str, port: int) -> None:
    """``host:port`` can be listened on (not in use, an address of this host)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[
            0
        ]
        with socket.socket(family, kind, proto) as sock:
            sock.bind(address)
    except OSError as exc:
        raise ProxyError(
            f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})"
        ) from None
