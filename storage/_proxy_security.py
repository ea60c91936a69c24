"""TLS and the shared token of ``search proxy``, read from files named by options or variables.

Like the storage URL (``$SEARCH_STORAGE_FILE``), every secret is a file (a compose secret, a
Kubernetes Secret volume), never a value on a command line. The proxy side:

- ``--tls-cert`` / ``$SEARCH_PROXY_TLS_CERT`` and ``--tls-key`` / ``$SEARCH_PROXY_TLS_KEY``:
  its PEM certificate (chain) and unencrypted private key: the proxy speaks TLS;
- ``--tls-client-ca`` / ``$SEARCH_PROXY_TLS_CLIENT_CA``: a CA; clients must then present a
  certificate it signed (mutual TLS);
- ``--token-file`` / ``$SEARCH_PROXY_TOKEN_FILE``: a shared token every call must carry.

The client side (workers and every command with ``--storage grpc://...``), from variables:
``$SEARCH_PROXY_TLS_CA`` (the CA that signed the proxy's certificate: the client speaks TLS),
``$SEARCH_PROXY_TLS_CLIENT_CERT`` and ``$SEARCH_PROXY_TLS_CLIENT_KEY`` (its own certificate,
for mutual TLS), ``$SEARCH_PROXY_TLS_SERVER_NAME`` (the name to check the proxy's certificate
for, if not the URL's host), and the same ``$SEARCH_PROXY_TOKEN_FILE``.

A file that is missing, unreadable or not what it should be is a one-line ``StorageError``.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from storage._error import StorageError

ENV_TLS_CERT = "SEARCH_PROXY_TLS_CERT"
ENV_TLS_KEY = "SEARCH_PROXY_TLS_KEY"
ENV_TLS_CLIENT_CA = "SEARCH_PROXY_TLS_CLIENT_CA"
ENV_TOKEN_FILE = "SEARCH_PROXY_TOKEN_FILE"
ENV_TLS_CA = "SEARCH_PROXY_TLS_CA"
ENV_TLS_CLIENT_CERT = "SEARCH_PROXY_TLS_CLIENT_CERT"
ENV_TLS_CLIENT_KEY = "SEARCH_PROXY_TLS_CLIENT_KEY"
ENV_TLS_SERVER_NAME = "SEARCH_PROXY_TLS_SERVER_NAME"
MIN_TOKEN_CHARS = 16
GENERATE_TOKEN = "generate one with `openssl rand -hex 24`"


class ProxySecurityError(StorageError):
    """A TLS or token file of the proxy or its client is missing, unreadable or wrong."""


@dataclass(frozen=True)
class ServerSecurity:
    """What ``search proxy`` asks of its clients (all ``None``: plain, no token)."""

    cert: bytes | None = None
    key: bytes | None = None
    client_ca: bytes | None = None
    token: str | None = None

    @property
    def tls(self) -> bool:
        return self.cert is not None

    def describe(self) -> str:
        """``TLS, client certificates, token`` or ``no TLS, no token`` (for the start line)."""
        parts = ["TLS" if self.tls else "no TLS"]
        if self.client_ca is not None:
            parts.append("client certificates")
        parts.append("token" if self.token else "no token")
        return ", ".join(parts)


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches ``search proxy`` (all ``None``: plain, no token)."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: str | None = None
    server_name: str | None = None

    @property
    def tls(self) -> bool:
        return self.ca is not None or self.cert is not None


def server_security(
    cert: str | None = None,
    key: str | None = None,
    client_ca: str | None = None,
    token_file: str | None = None,
) -> ServerSecurity:
    """The proxy's TLS files and token, from its options, else the variables (module doc).

    Raises:
        ProxySecurityError: A file is missing, unreadable or not a certificate, key or token; a
            certificate without its key or the other way round; a client CA without TLS.
    """
    cert_at = _named(cert, "--tls-cert", ENV_TLS_CERT)
    key_at = _named(key, "--tls-key", ENV_TLS_KEY)
    ca_at = _named(client_ca, "--tls-client-ca", ENV_TLS_CLIENT_CA)
    token_at = _named(token_file, "--token-file", ENV_TOKEN_FILE)
    if ca_at is not None and cert_at is None:
        raise ProxySecurityError(f"{ca_at[1]}: client certificates need --tls-cert and --tls-key")
    _check_files(
        cert_at, key_at, ca_at, "TLS needs the key too (--tls-key)",
        "TLS needs the certificate too (--tls-cert)",
    )  # fmt: skip
    return ServerSecurity(
        cert=_read(cert_at) if cert_at else None,
        key=_read(key_at) if key_at else None,
        client_ca=_read(ca_at) if ca_at else None,
        token=read_token(*token_at) if token_at else None,
    )


def _check_files(
    cert_at: tuple[str, str] | None,
    key_at: tuple[str, str] | None,
    ca_at: tuple[str, str] | None,
    no_key: str,
    no_cert: str,
) -> None:
    """A certificate comes with its key (and the other way round), each file what it says."""
    if cert_at is not None and key_at is None:
        raise ProxySecurityError(f"{cert_at[1]}: {no_key}")
    if key_at is not None and cert_at is None:
        raise ProxySecurityError(f"{key_at[1]}: {no_cert}")
    if cert_at is not None and key_at is not None:
        _check_pair(cert_at, key_at)
    if ca_at is not None:
        _check_ca(ca_at)


def client_security() -> ClientSecurity:
    """A client's TLS files and token, from the variables (module doc).

    Raises:
        ProxySecurityError: As :func:`server_security`.
    """
    ca_at = _named(None, "", ENV_TLS_CA)
    cert_at = _named(None, "", ENV_TLS_CLIENT_CERT)
    key_at = _named(None, "", ENV_TLS_CLIENT_KEY)
    token_at = _named(None, "", ENV_TOKEN_FILE)
    _check_files(
        cert_at, key_at, ca_at, f"a client certificate needs ${ENV_TLS_CLIENT_KEY}",
        f"a client key needs ${ENV_TLS_CLIENT_CERT}",
    )  # fmt: skip
    name = os.environ.get(ENV_TLS_SERVER_NAME, "").strip() or None
    return ClientSecurity(
        ca=_read(ca_at) if ca_at else None,
        cert=_read(cert_at) if cert_at else None,
        key=_read(key_at) if key_at else None,
        token=read_token(*token_at) if token_at else None,
        server_name=name,
    )


def read_token(path: str, where: str) -> str:
    """The token in the file ``path`` (one line, at least 16 printable ASCII characters)."""
    try:
        text = Path(path).read_bytes().decode("ascii").strip()
    except UnicodeDecodeError:
        raise ProxySecurityError(f"{where}: the token must be ASCII ({GENERATE_TOKEN})") from None
    except OSError as exc:
        raise ProxySecurityError(f"{where}: {_reason(exc)}") from None
    if not text:
        raise ProxySecurityError(f"{where}: the file is empty (it must hold the token)")
    if any(c.isspace() for c in text) or not text.isprintable():
        raise ProxySecurityError(f"{where}: the file must hold one token: one line, no spaces")
    if len(text) < MIN_TOKEN_CHARS:
        raise ProxySecurityError(
            f"{where}: the token is too short ({len(text)} characters, at least "
            f"{MIN_TOKEN_CHARS}): {GENERATE_TOKEN}"
        )
    return text


def _named(option: str | None, flag: str, env: str) -> tuple[str, str] | None:
    """``(path, where)`` of a file given by ``option`` (as ``flag``) or ``$env``; blank: None."""
    if option is not None and option.strip():
        return option.strip(), f"{flag} {option.strip()}"
    value = os.environ.get(env, "").strip()
    return (value, f"${env}={value}") if value else None


def _read(named: tuple[str, str]) -> bytes:
    path, where = named
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ProxySecurityError(f"{where}: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    return f"cannot read it ({exc.strerror or type(exc).__name__})"


def _check_pair(cert: tuple[str, str], key: tuple[str, str]) -> None:
    """The certificate and key files load together (PEM, the key unencrypted and matching)."""
    _read(cert), _read(key)  # missing or unreadable: said per file
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert[0], key[0], password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise ProxySecurityError(
            f"{cert[1]} and {key[1]}: not a PEM certificate and its unencrypted private key "
            f"({getattr(exc, 'reason', None) or exc.strerror or type(exc).__name__})"
        ) from None


def _check_ca(ca: tuple[str, str]) -> None:
    """The CA file holds at least one PEM certificate."""
    _read(ca)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=ca[0])
    except (ssl.SSLError, OSError) as exc:
        raise ProxySecurityError(
            f"{ca[1]}: not a PEM CA certificate "
            f"({getattr(exc, 'reason', None) or exc.strerror or type(exc).__name__})"
        ) from None
    if not context.cert_store_stats()["x509"]:
        raise ProxySecurityError(f"{ca[1]}: no CA certificate in it")
