"""``grpc``, imported with its C core's INFO lines off (unless ``$GRPC_VERBOSITY`` is set).

Without this, a client whose TLS handshake fails prints gRPC's own lines per retry before our
one-line error. Modules of ``storage`` import ``grpc`` from here.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402 - after the variable, which the C core reads when loaded

__all__ = ["grpc"]
