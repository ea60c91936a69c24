"""``search dashboard``: optuna-dashboard on the study storage, the URL read like every command's.

The storage URL comes from ``--storage``, ``$SEARCH_STORAGE`` or ``$SEARCH_STORAGE_FILE`` (a
secret file), so no password is ever on a command line (``ps``, ``docker inspect``), and the
storage is built by ``storage.create_storage``: psycopg 3 URLs, ``pool_pre_ping`` and retries
while the database restarts.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType

from search.observe.artifacts import artifact_dir
from search.observe.artifacts import artifact_store
from search.observe.install import install_hint
from storage import check_password
from storage import create_storage
from storage import is_loopback
from storage import redact_url


class DashboardError(RuntimeError):
    """The dashboard cannot start: not installed, a public address not allowed, port taken."""


def check_host(host: str, *, public: bool) -> str | None:
    """Refuse a non-loopback ``host`` without ``public``; with it, the warning to print.

    Raises:
        DashboardError: A non-loopback host and ``public`` false.
    """
    if is_loopback(host):
        return None
    if not public:
        raise DashboardError(
            f"--host {host}: the dashboard has no login, so it listens on loopback only "
            "(127.0.0.1); add --public to serve it on another address"
        )
    return (
        f"warning: the dashboard has no login: anyone who can reach {host} can read and edit "
        "every study in this storage and download the trained models it keeps (the artifact "
        "store); publish it only on a private network or behind a proxy with authentication"
    )


def serve(
    url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    artifacts: str | Path | None = None,
    public: bool = False,
) -> None:
    """Serve optuna-dashboard for the studies in ``url`` until SIGTERM or Ctrl-C.

    Args:
        url: Storage URL (resolved already: ``storage.resolve_storage_url``).
        host: Address to listen on; not loopback only with ``public``.
        port: Port to listen on.
        artifacts: The artifact directory (default: ``$SEARCH_ARTIFACTS``, else beside a
            SQLite file; a server database without one is served without artifacts).
        public: Allow a non-loopback ``host`` (prints a warning: no login, and the kept
            models can be downloaded).

    Raises:
        DashboardError: optuna-dashboard is not installed, a non-loopback host without
            ``public``, or the port cannot be bound.
        StorageError: The storage is unusable, or its password a placeholder.
    """
    warning = check_host(host, public=public)
    check_password(url)
    try:
        import optuna_dashboard
    except ImportError:
        raise DashboardError(
            f"optuna-dashboard is not installed (a partial install): {install_hint()}"
        ) from None
    storage = create_storage(url, heartbeat_interval=None, must_exist=True)
    directory = artifact_dir(url, artifacts)
    store = artifact_store(directory) if directory is not None else None
    signal.signal(signal.SIGTERM, _exit_quietly)  # as PID 1 in a container, too
    if warning:
        print(warning, file=sys.stderr, flush=True)
    shown = f"[{host}]" if ":" in host else host
    where = f"artifacts in {directory}" if directory else "no artifact store (--artifacts DIR)"
    print(f"optuna-dashboard for {redact_url(url)} on http://{shown}:{port} ({where})", flush=True)
    try:
        optuna_dashboard.run_server(storage, host=host, port=port, artifact_store=store)
    except OSError as exc:
        raise DashboardError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    """Stop now: nothing to save (the server keeps no state), and a blocked request or a
    worker thread must not hold up ``docker stop``."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
