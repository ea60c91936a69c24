"""``search proxy`` with TLS and a token: a real proxy process, real certificates (``openssl``).

The certificates are made by ``tools/proxy_certs.sh`` (the README's way): a CA, the proxy's
certificate for ``localhost`` and ``127.0.0.1``, a worker's client certificate, the token; and
a second CA nobody trusts. The proxy runs
with TLS, client certificates (mutual TLS) and a token; the right client works end to end, and
a plain client, a client without the token or with a wrong one, and a client without a
certificate are refused, with nothing created. The file mistakes and a public ``--host``
without TLS and a token are one line and exit 2 before any storage is opened.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import optuna
import pytest
from _cli import search_env
from _cli_cases import Case
from _cli_cases import run_cases
from _cli_workers import wait_for

from storage import ServerSecurity
from storage import create_storage

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

ROOT = Path(__file__).resolve().parents[1]
MAKE_CERTS = ROOT / "tools" / "proxy_certs.sh"  # what the README tells users to run


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files ``tools/proxy_certs.sh`` makes for localhost and 127.0.0.1, a wrong token,
    and ``other/``: a second CA nobody trusts."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make the test certificates")
    where = tmp_path_factory.mktemp("certs")
    for target, names in ((where, ["localhost", "127.0.0.1"]), (where / "other", ["localhost"])):
        subprocess.run(["sh", str(MAKE_CERTS), str(target), *names], check=True, timeout=120,
                       capture_output=True)  # fmt: skip
    (where / "wrong-token").write_text("f" * 48 + "\n")
    return where


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proxy:
    """A ``search proxy`` process with TLS, client certificates and the token."""

    def __init__(self, tmp: Path, certs: Path, *extra: str, host: str = "127.0.0.1") -> None:
        self.port = _free_port()
        self.db = tmp / "proxied.db"
        self.err = tmp / f"proxy-{self.port}.err"
        args = ["proxy", "--host", host, "--port", str(self.port), *extra]
        with open(tmp / f"proxy-{self.port}.out", "w") as out, open(self.err, "w") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "search.cli", *args],
                env=search_env({"SEARCH_STORAGE": f"sqlite:///{self.db}"}),
                cwd=tmp,
                stdout=out,
                stderr=err,
            )
        self.out = tmp / f"proxy-{self.port}.out"

        def listening() -> bool:
            assert self.popen.poll() is None, self.err.read_text()
            return "search proxy:" in self.out.read_text()

        wait_for("the proxy to listen", listening, 60)

    def stop(self) -> None:
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()


@pytest.fixture(scope="module")
def mtls_proxy(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Proxy]:
    proxy = Proxy(
        tmp_path_factory.mktemp("mtls"),
        certs,
        *("--tls-cert", str(certs / "proxy_cert.pem"), "--tls-key", str(certs / "proxy_key.pem")),
        *(
            "--tls-client-ca",
            str(certs / "proxy_ca.pem"),
            "--token-file",
            str(certs / "proxy_token"),
        ),
    )
    yield proxy
    proxy.stop()


def _client_env(
    certs: Path, *, ca: bool = True, cert: bool = True, token: str = "proxy_token"
) -> dict:
    env = {"SEARCH_CONNECT_TIMEOUT": "1"}
    if ca:
        env["SEARCH_PROXY_TLS_CA"] = str(certs / "proxy_ca.pem")
    if cert:
        env["SEARCH_PROXY_TLS_CLIENT_CERT"] = str(certs / "proxy_client_cert.pem")
        env["SEARCH_PROXY_TLS_CLIENT_KEY"] = str(certs / "proxy_client_key.pem")
    if token:
        env["SEARCH_PROXY_TOKEN_FILE"] = str(certs / token)
    return env


def _study_names(proxy: Proxy) -> list[str]:
    """The studies in the proxy's database, read straight from the file."""
    store = create_storage(f"sqlite:///{proxy.db}", heartbeat_interval=None)
    return sorted(s.study_name for s in optuna.get_all_study_summaries(store))


def _channel(certs: Path, port: int, *, cert: bool) -> grpc.Channel:
    pem = (certs / "proxy_ca.pem").read_bytes()
    pair = (
        (certs / "proxy_client_key.pem").read_bytes(),
        (certs / "proxy_client_cert.pem").read_bytes(),
    )
    creds = grpc.ssl_channel_credentials(pem, *(pair if cert else (None, None)))
    return grpc.secure_channel(f"localhost:{port}", creds)


def _refused(channel: grpc.Channel, token: str | None) -> grpc.StatusCode:
    """The status of a study creation (Optuna's and ours) and a read, sent with ``token``."""
    metadata = [("authorization", f"Bearer {token}")] if token is not None else None
    codes = set()
    calls = [
        ("/search.Extras/CreateStudy", json.dumps({"name": "intruder", "directions": ["MINIMIZE"],
                                                   "token": "t"}).encode()),
        ("/optuna.StorageService/CreateNewStudy", b""),
        ("/optuna.StorageService/GetAllStudies", b""),
    ]  # fmt: skip
    for method, body in calls:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(method)(body, timeout=10, metadata=metadata)
        codes.add(caught.value.code())
    assert len(codes) == 1, codes
    return codes.pop()


def test_a_client_with_the_ca_its_certificate_and_the_token_works_end_to_end(
    mtls_proxy: Proxy, certs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "(TLS, client certificates, token)" in mtls_proxy.out.read_text()
    url = f"grpc://localhost:{mtls_proxy.port}"
    for name, value in _client_env(certs).items():
        monkeypatch.setenv(name, value)
    store = create_storage(url, heartbeat_interval=None)
    study = optuna.create_study(storage=store, study_name="through-tls")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    optuna.create_study(storage=store, study_name="deleted")
    optuna.delete_study(study_name="deleted", storage=store)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert "through-tls" in _study_names(mtls_proxy)
    assert "deleted" not in _study_names(mtls_proxy)
    # And the CLI, with the files from the same variables.
    (done,) = run_cases(
        [Case(["report", "--study", "through-tls", "--storage", url], {})],
        cwd=tmp_path,
        env=_client_env(certs),
    )
    assert done.code == 0, done.stderr
    assert "through-tls" in done.stdout


def test_plain_tokenless_wrong_token_and_certless_clients_are_refused_and_create_nothing(
    mtls_proxy: Proxy, certs: Path, tmp_path: Path
) -> None:
    port = mtls_proxy.port
    before = _study_names(mtls_proxy)
    # Optuna's own plain client: no TLS, so no connection at all.
    plain = optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=port)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            plain.get_all_studies()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        plain.close()
    # TLS with a client certificate, without the token or with a wrong one: UNAUTHENTICATED.
    with _channel(certs, port, cert=True) as channel:
        assert _refused(channel, None) == grpc.StatusCode.UNAUTHENTICATED
        assert _refused(channel, "f" * 48) == grpc.StatusCode.UNAUTHENTICATED
    # The token but no client certificate: the handshake fails (mutual TLS).
    with _channel(certs, port, cert=False) as channel:
        token = (certs / "proxy_token").read_text().strip()
        assert _refused(channel, token) == grpc.StatusCode.UNAVAILABLE
    assert _study_names(mtls_proxy) == before
    # The same refusals through the CLI: one line each, exit 2 (127.0.0.1: "localhost" may
    # also resolve to ::1, where nothing listens, and gRPC reports the last address's error).
    url = f"grpc://127.0.0.1:{port}"
    cases = {
        "no valid token": _client_env(certs, token=""),
        "refused this client": _client_env(certs, token="wrong-token"),
        "it may need a client certificate": _client_env(certs, cert=False),
        "it may need TLS": _client_env(certs, ca=False, cert=False),
        "CERTIFICATE_VERIFY_FAILED": {  # the proxy's certificate from a CA not trusted
            **_client_env(certs),
            "SEARCH_PROXY_TLS_CA": str(certs / "other" / "proxy_ca.pem"),
        },
    }
    results = run_cases(
        [Case(["storage", "check", "--storage", url], env) for env in cases.values()],
        cwd=tmp_path,
    )
    for expected, done in zip(cases, results, strict=True):
        assert done.code == 2, (expected, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # not gRPC's lines
        assert expected in done.stderr
    assert _study_names(mtls_proxy) == before


def test_bad_files_and_a_public_host_without_tls_and_token_are_one_line_exit_2(
    certs: Path, tmp_path: Path
) -> None:
    (tmp_path / "empty").write_text("")
    (tmp_path / "short").write_text("abc123\n")
    (tmp_path / "spaced").write_text("0123456789abcdef 0123456789abcdef\n")
    cert, key = str(certs / "proxy_cert.pem"), str(certs / "proxy_key.pem")
    tls = ["--tls-cert", cert, "--tls-key", key]
    token = ["--token-file", str(certs / "proxy_token")]
    missing = str(tmp_path / "missing.pem")
    proxy = ["proxy", "--port", str(_free_port())]
    cases = [
        ([*proxy, "--tls-cert", missing, "--tls-key", key], {}, f"--tls-cert {missing}: no such"),
        ([*proxy, "--tls-cert", cert], {}, "TLS needs the key too"),
        ([*proxy, "--tls-key", key], {}, "TLS needs the certificate too"),
        ([*proxy, "--tls-client-ca", cert], {}, "client certificates need --tls-cert"),
        ([*proxy, "--tls-cert", cert, "--tls-key", str(certs / "proxy_client_key.pem")], {},
         "not a PEM certificate and its unencrypted private key"),
        ([*proxy, *tls, "--tls-client-ca", str(certs / "proxy_token")], {}, "not a PEM CA"),
        ([*proxy, "--tls-cert", str(tmp_path), "--tls-key", key], {}, "cannot read it"),
        ([*proxy, "--token-file", missing], {}, f"--token-file {missing}: no such file"),
        ([*proxy, "--token-file", str(tmp_path / "empty")], {}, "the file is empty"),
        ([*proxy, "--token-file", str(tmp_path / "short")], {}, "the token is too short"),
        ([*proxy, "--token-file", str(tmp_path / "spaced")], {}, "one line, no spaces"),
        (proxy, {"SEARCH_PROXY_TLS_CERT": missing, "SEARCH_PROXY_TLS_KEY": key},
         f"$SEARCH_PROXY_TLS_CERT={missing}: no such file"),
        ([*proxy, "--host", "0.0.0.0"], {}, "it has no TLS and no token"),
        ([*proxy, "--host", "0.0.0.0", *tls], {}, "it has no token"),
        ([*proxy, "--host", "0.0.0.0", *token], {}, "it has no TLS"),
        ([*proxy, "--host", "proxy.example"], {}, "--host proxy.example: beyond loopback"),
        (["storage", "check", "--storage", "grpc://127.0.0.1:1"],
         {"SEARCH_PROXY_TLS_CA": missing}, f"$SEARCH_PROXY_TLS_CA={missing}: no such file"),
        (["report", "--study", "s", "--storage", "grpc://127.0.0.1:1"],
         {"SEARCH_PROXY_TOKEN_FILE": str(tmp_path / "short")}, "the token is too short"),
        (["storage", "check", "--storage", "grpc://127.0.0.1:1"],
         {"SEARCH_PROXY_TLS_CLIENT_CERT": str(certs / "proxy_client_cert.pem")},
         "a client certificate needs $SEARCH_PROXY_TLS_CLIENT_KEY"),
    ]  # fmt: skip
    results = run_cases(
        [Case(args, env) for args, env, _ in cases],
        cwd=tmp_path,
        env={"SEARCH_STORAGE": f"sqlite:///{tmp_path / 'never.db'}"},
    )
    for (_, _, expected), done in zip(cases, results, strict=True):
        shown = f"{done.case.args}: {done.stderr}"
        assert done.code == 2, shown
        assert "Traceback" not in done.stderr, shown
        assert len(done.stderr.strip().splitlines()) == 1, shown
        assert expected in done.stderr, shown
    assert not (tmp_path / "never.db").exists()  # refused before any storage was opened


def test_insecure_public_serves_with_a_one_line_warning(tmp_path: Path, certs: Path) -> None:
    proxy = Proxy(tmp_path, certs, "--insecure-public", host="0.0.0.0")  # briefly
    try:
        warning = [line for line in proxy.err.read_text().splitlines() if line.strip()]
        assert len(warning) == 1 and warning[0].startswith("warning: --insecure-public")
        assert "no TLS and no token" in warning[0] and "delete every study" in warning[0]
        store = create_storage(f"grpc://127.0.0.1:{proxy.port}", heartbeat_interval=None)
        assert optuna.get_all_study_summaries(store) == []
    finally:
        proxy.stop()


def test_tls_and_a_token_allow_a_public_host_without_a_warning() -> None:
    from search.cli.proxy import check_host

    token = "0123456789abcdef0123"
    secured = ServerSecurity(cert=b"c", key=b"k", token=token)
    assert check_host("0.0.0.0", 13000, secured, insecure_public=False) is None
    assert check_host("127.0.0.1", 13000, ServerSecurity(), insecure_public=False) is None
    warning = check_host("10.0.0.5", 13000, ServerSecurity(token=token), insecure_public=True)
    assert warning is not None and "no TLS:" in warning
