"""gRPC's side of ``storage._proxy_security``: the proxy's port and check, the client's channel.

The token travels as call metadata (``authorization: Bearer TOKEN``) on every call; the proxy's
server interceptor refuses a call without it (``UNAUTHENTICATED``) before any handler runs.
TLS is gRPC's own (``grpc.ssl_server_credentials`` / ``grpc.ssl_channel_credentials``).
"""

from __future__ import annotations

import hmac
from collections import namedtuple
from collections.abc import Callable
from typing import Any

from storage._grpc import grpc
from storage._proxy_security import ClientSecurity
from storage._proxy_security import ServerSecurity

METADATA_KEY = "authorization"
# The client reconnects to a proxy that was away within about a second of its return (gRPC's
# default backoff grows to 120 s).
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def add_port(server: grpc.Server, address: str, security: ServerSecurity) -> int:
    """Bind ``address`` with TLS (and client certificates) if configured; 0 if it cannot."""
    if not security.tls:
        return server.add_insecure_port(address)
    credentials = grpc.ssl_server_credentials(
        [(security.key, security.cert)],
        root_certificates=security.client_ca,
        require_client_auth=security.client_ca is not None,
    )
    return server.add_secure_port(address, credentials)


class TokenCheck(grpc.ServerInterceptor):  # type: ignore[misc]
    """Refuse every call that does not carry the proxy's token (``UNAUTHENTICATED``)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def refuse(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid token for search proxy")

        self._refuse = grpc.unary_unary_rpc_method_handler(refuse)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        for key, value in details.invocation_metadata or ():
            given = value.encode() if isinstance(value, str) else bytes(value)
            if key == METADATA_KEY and hmac.compare_digest(given, self._expected):
                return continuation(details)
        return self._refuse


class _Details(
    namedtuple(
        "_Details",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    pass


class _CallDefaults(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
):
    """Add the token to every call's metadata; a unary call without a deadline waits for the
    proxy (``wait_for_ready``) up to ``wait_s``, so it goes through as soon as a restarted
    proxy is back (gRPC reconnects within a second), not after a retry's backoff."""

    def __init__(self, token: str | None, wait_s: float) -> None:
        self._pairs = [(METADATA_KEY, f"Bearer {token}")] if token else []
        self._wait_s = wait_s

    def _details(self, details: grpc.ClientCallDetails, *, unary: bool) -> _Details:
        waits = unary and details.timeout is None
        return _Details(
            details.method,
            self._wait_s if waits else details.timeout,
            [*(details.metadata or ()), *self._pairs],
            details.credentials,
            True if waits else details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details, unary=True), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details, unary=False), request)


def client_channel(
    host: str, port: int, security: ClientSecurity, *, wait_s: float = 120.0
) -> grpc.Channel:
    """A channel to the proxy at ``host:port``: TLS and the token as configured; a unary call
    waits up to ``wait_s`` for a proxy that is away (``_CallDefaults``)."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    options = list(CHANNEL_OPTIONS)
    if security.tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=security.ca,
            private_key=security.key,
            certificate_chain=security.cert,
        )
        if security.server_name:
            options.append(("grpc.ssl_target_name_override", security.server_name))
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(channel, _CallDefaults(security.token, wait_s))
