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
from types import FrameType

from storage import check_password
from storage import create_storage
from storage import redact_url

INSTALL = "pip install 'ko-retrieval-search[dashboard]'"


class DashboardError(RuntimeError):
    """The dashboard cannot start: not installed, or the address is taken."""


def serve(url: str, *, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve optuna-dashboard for the studies in ``url`` until SIGTERM or Ctrl-C.

    Args:
        url: Storage URL (resolved already: ``storage.resolve_storage_url``).
        host: Address to listen on (``0.0.0.0`` in a container).
        port: Port to listen on.

    Raises:
        DashboardError: optuna-dashboard is not installed, or the port cannot be bound.
        StorageError: The storage is unusable, or its password a placeholder.
    """
    check_password(url)
    try:
        import optuna_dashboard
    except ImportError:
        raise DashboardError(f"optuna-dashboard is not installed: {INSTALL}") from None
    storage = create_storage(url, heartbeat_interval=None, must_exist=True)
    signal.signal(signal.SIGTERM, _exit_quietly)  # as PID 1 in a container, too
    print(f"optuna-dashboard for {redact_url(url)} on http://{host}:{port}", flush=True)
    try:
        optuna_dashboard.run_server(storage, host=host, port=port)
    except OSError as exc:
        raise DashboardError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    """Stop now: nothing to save (the server keeps no state), and a blocked request or a
    worker thread must not hold up ``docker stop``."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
