"""``search proxy``'s security options (files, like ``--storage-file``; each has a variable)."""

from __future__ import annotations

from typing import Annotated

import typer

TlsCertOpt = Annotated[
    str | None,
    typer.Option(
        "--tls-cert",
        help="PEM certificate (chain) file: serve TLS ($SEARCH_PROXY_TLS_CERT).",
        show_default=False,
    ),
]
TlsKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--tls-key",
        help="Its unencrypted PEM private key file ($SEARCH_PROXY_TLS_KEY).",
        show_default=False,
    ),
]
TlsClientCaOpt = Annotated[
    str | None,
    typer.Option(
        "--tls-client-ca",
        help="CA file: require client certificates it signed ($SEARCH_PROXY_TLS_CLIENT_CA).",
        show_default=False,
    ),
]
TokenFileOpt = Annotated[
    str | None,
    typer.Option(
        "--token-file",
        help="File holding a shared token every call must carry ($SEARCH_PROXY_TOKEN_FILE).",
        show_default=False,
    ),
]
InsecurePublicOpt = Annotated[
    bool,
    typer.Option(
        "--insecure-public",
        help="Allow a non-loopback --host without TLS and a token (anyone can reach studies).",
    ),
]
