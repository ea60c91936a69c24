"""The compose file keeps passwords off command lines and out of the environment.

Postgres reads its password from a secret file (``POSTGRES_PASSWORD_FILE``), workers and the
dashboard read the storage URL from one (``SEARCH_STORAGE_FILE``), the dashboard is our image
running ``search dashboard``, and the secret files and the default database are git-ignored.
(``.ci/run`` also validates the file with ``docker-compose config -q``.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
SEARCH_SERVICES = [n for n, s in SERVICES.items() if s.get("image", "").startswith("ko-retrieval")]


def _secret_path(service: dict[str, Any], variable: str) -> str:
    path = str(service["environment"][variable])
    assert path.startswith("/run/secrets/"), path
    name = path.removeprefix("/run/secrets/")
    assert name in service["secrets"] and name in COMPOSE["secrets"], name
    return str(COMPOSE["secrets"][name]["file"])


def test_no_password_on_any_command_line_or_in_any_environment() -> None:
    for name, service in SERVICES.items():
        command = " ".join(map(str, service.get("command", [])))
        assert "://" not in command and "PASSWORD" not in command.upper(), name
        for key, value in (service.get("environment") or {}).items():
            assert key != "POSTGRES_PASSWORD", (name, key)
            if key == "SEARCH_STORAGE":  # only the optional proxy URL, blank by default
                assert value == "${SEARCH_WORKER_STORAGE:-}", (name, value)
            assert not re.search(r"://[^/@\s]*:[^@\s]*@", str(value)), (name, key)


def test_postgres_workers_and_dashboard_read_secret_files() -> None:
    assert _secret_path(SERVICES["postgres"], "POSTGRES_PASSWORD_FILE").startswith("./secrets/")
    assert set(SEARCH_SERVICES) >= {"dashboard", "worker", "worker-gpu1"}
    for name in SEARCH_SERVICES:
        path = _secret_path(SERVICES[name], "SEARCH_STORAGE_FILE")
        assert path == "./secrets/search_storage", name
    assert SERVICES["dashboard"]["command"][0] == "dashboard"
    assert "0.0.0.0" in SERVICES["dashboard"]["command"]
    assert all(p.startswith("127.0.0.1:") for p in SERVICES["dashboard"]["ports"])


def test_secret_files_and_the_default_database_are_git_ignored() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["secrets/search_storage", "secrets/postgres_password", "search.db", "search.db.lock"]
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.stdout.split() == paths


def test_example_env_holds_no_password_and_says_how_to_generate_one() -> None:
    text = (ROOT / ".env.example").read_text()
    assert not re.search(r"(?m)^\s*POSTGRES_PASSWORD\s*=", text)
    assert "openssl rand -hex 24" in text and "secrets/search_storage" in text


def test_the_proxy_is_optional_reads_the_secret_and_is_not_published() -> None:
    proxy = SERVICES["proxy"]
    assert proxy["profiles"] == ["proxy"]  # off by default
    assert proxy["command"][:1] == ["proxy"] and "0.0.0.0" in proxy["command"]
    assert "--insecure-public" not in proxy["command"]  # TLS and the token instead
    assert _secret_path(proxy, "SEARCH_STORAGE_FILE") == "./secrets/search_storage"
    assert "ports" not in proxy  # the compose network only, unless the user publishes it
    assert SERVICES["worker"]["environment"]["SEARCH_STORAGE"] == "${SEARCH_WORKER_STORAGE:-}"


def test_the_proxy_and_its_workers_read_tls_and_the_token_from_secret_files(
    tmp_path: Path,
) -> None:
    from storage._proxy_security import ENV_TLS_CA
    from storage._proxy_security import ENV_TLS_CERT
    from storage._proxy_security import ENV_TLS_KEY
    from storage._proxy_security import ENV_TOKEN_FILE

    proxy = SERVICES["proxy"]
    files = {name: _secret_path(proxy, name) for name in (ENV_TLS_CERT, ENV_TLS_KEY)}
    token = _secret_path(proxy, ENV_TOKEN_FILE)
    for name in ("worker", "worker-gpu1"):
        assert _secret_path(SERVICES[name], ENV_TOKEN_FILE) == token  # one shared token
        files[f"{name} CA"] = _secret_path(SERVICES[name], ENV_TLS_CA)
    # tools/proxy_certs.sh, as the header says, makes every one of these files, and the
    # proxy's certificate names the host the workers dial (grpc://proxy:13000).
    made = tmp_path / "secrets"
    subprocess.run(
        ["sh", str(ROOT / "tools" / "proxy_certs.sh"), str(made), "proxy"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    for path in [*files.values(), token]:
        assert path.startswith("./secrets/"), path
        assert (made / path.removeprefix("./secrets/")).is_file(), path
    assert "tools/proxy_certs.sh secrets proxy" in (ROOT / "docker-compose.yml").read_text()
    names = subprocess.run(
        ["openssl", "x509", "-in", str(made / "proxy_cert.pem"), "-noout", "-ext",
         "subjectAltName"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert "DNS:proxy" in names
