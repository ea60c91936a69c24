"""``search proxy``: Optuna's gRPC storage proxy in front of the study database.

Many workers (``--storage grpc://host:port``) talk to one proxy, which holds the database
connections (one pool, not one per worker) and Optuna's trial cache. Besides Optuna's storage
service it serves what the budget rule needs and Optuna's API lacks (heartbeats, the stale
query, the fail-and-re-queue transaction, the study's lock: ``storage._proxy_client``).
Beyond loopback it needs TLS and a shared token (``storage._proxy_security``: files named by
``--tls-cert``/``--tls-key``/``--tls-client-ca``/``--token-file`` or their variables), or
``--insecure-public`` (a warning: anyone who reaches the port can read and delete studies).
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
from types import FrameType

import optuna

from storage import ServerSecurity
from storage import StorageError
from storage import create_storage
from storage import is_loopback
from storage import is_proxy_url
from storage import make_proxy_server  # imports grpc only when called
from storage import redact_url

DEFAULT_PORT = 13000
# The proxy's own pool: it serves every worker, so more than one worker's 4 + 4.
POOL = (8, 8)
STOP_GRACE_S = 5.0  # calls in flight may finish this long after SIGTERM


class ProxyError(StorageError):
    """The proxy cannot start (a proxy URL as its storage, an address it cannot bind)."""


def serve(
    url: str,
    *,
    host: str,
    port: int,
    threads: int,
    security: ServerSecurity | None = None,
    insecure_public: bool = False,
) -> str:
    """Serve ``url`` on ``host:port`` until SIGTERM or SIGINT; return the signal's name.

    Args:
        url: The database (``postgresql://...``, ``sqlite:///...``), already resolved.
        host: Address to listen on; not loopback only with TLS and a token in ``security``,
            or ``insecure_public``.
        port: Port to listen on.
        threads: Server threads (half of them at most wait for locks).
        security: TLS files and the token (``storage.server_security``); None: neither.
        insecure_public: Allow a non-loopback ``host`` without TLS and a token (a warning).
    """
    security = security or ServerSecurity()
    if is_proxy_url(url):
        raise ProxyError(
            f"--storage {redact_url(url)}: the proxy needs the database's URL, not a proxy's"
        )
    warning = check_host(host, port, security, insecure_public=insecure_public)
    _check_address(host, port)  # before gRPC, which logs its own multi-line bind error
    shown = redact_url(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study created
    storage = create_storage(url, heartbeat_interval=None, pool=POOL)
    try:
        server = make_proxy_server(
            storage,  # type: ignore[arg-type]
            host,
            port,
            threads=threads,
            url=shown,
            security=security,
        )
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
        if warning:
            print(warning, file=sys.stderr, flush=True)
        where = f"[{host}]" if ":" in host else host
        print(f"search proxy: {shown} on grpc://{where}:{port} ({security.describe()})",
              flush=True)  # fmt: skip
        stopped.wait()
    finally:
        server.stop(STOP_GRACE_S).wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        engine = getattr(storage, "engine", None)
        if engine is not None:
            engine.dispose()
    return caught[0] if caught else "stop"


def check_host(
    host: str, port: int, security: ServerSecurity, *, insecure_public: bool
) -> str | None:
    """Refuse a non-loopback ``host`` without TLS and a token, unless ``insecure_public``;
    return the warning to print then (None when none is due).

    Raises:
        ProxyError: A non-loopback host, without TLS and a token, without ``insecure_public``.
    """
    if is_loopback(host) or (security.tls and security.token):
        return None
    missing = [
        what
        for what, given in (("TLS", security.tls), ("token", security.token is not None))
        if not given
    ]
    if not insecure_public:
        raise ProxyError(
            f"--host {host}: beyond loopback the proxy needs TLS (--tls-cert, --tls-key) and a "
            f"token (--token-file); it has no {' and no '.join(missing)} (or add "
            f"--insecure-public, and anyone who reaches the port can read and delete studies)"
        )
    return (
        f"warning: --insecure-public: no {' and no '.join(missing)}: anyone who can reach "
        f"{host}:{port} can read, change and delete every study in this storage"
    )


def _check_address(host: str, port: int) -> None:
    """``host:port`` can be listened on (not in use, an address of this host).

    ``SO_REUSEADDR``, as gRPC binds: a connection of a killed proxy left in TIME-WAIT does not
    hold the port (a proxy restarted at once serves at once), a listening socket still does.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[
            0
        ]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        raise ProxyError(
            f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})"
        ) from None
