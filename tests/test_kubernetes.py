"""deploy/kubernetes: every manifest valid for the Kubernetes API, no secret in any, one GPU per
worker, the dashboard inside the cluster only, every pod non-root.

The kustomizations are rendered by ``kubectl kustomize`` where kubectl is installed, else by
the small renderer below (``resources``, ``namespace``, ``images`` and inline JSON patches:
what these kustomizations use); where both exist, a test checks that they agree. Validation
uses kubernetes-validate's offline schemas of one fixed Kubernetes version.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = {"base": DEPLOY / "base", "proxy": DEPLOY / "overlays" / "proxy"}
K8S_VERSION = "1.33.0"  # backoffLimitPerIndex and podFailurePolicy are GA there
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding"}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"}
EXPOSING_KINDS = {"Ingress", "IngressClass", "Gateway", "HTTPRoute", "GRPCRoute", "Route"}
# A URL carrying a password (scheme://user:password@host), a database URL, a password=... pair.
SECRET_PATTERNS = (
    re.compile(r"[a-z][a-z0-9+.-]*://[^\s/@:]*:[^\s/@]+@", re.I),
    re.compile(r"\b(?:postgres(?:ql)?|mysql|sqlite)(?:\+\w+)?://", re.I),
    re.compile(r"\bpassword\s*=", re.I),
)

Doc = dict[str, Any]


# --- rendering -----------------------------------------------------------------------------


def _json_patch(doc: Doc, ops: list[dict[str, Any]]) -> None:
    """Apply RFC 6902 ``add`` / ``replace`` / ``remove`` operations to ``doc`` in place."""
    for op in ops:
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"][1:].split("/")
        ]
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if op["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
        elif isinstance(node, list):
            if op["op"] == "add":
                node.insert(len(node) if last == "-" else int(last), op["value"])
            else:
                node[int(last)] = op["value"]
        else:
            node[last] = op["value"]


def _targets(doc: Doc, target: dict[str, str]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    want = {"kind": doc["kind"], "name": doc["metadata"]["name"], "group": group}
    want["version"] = version
    return all(want.get(k) == v for k, v in target.items() if k in want)


def _containers(doc: Doc) -> Iterator[Doc]:
    spec = _pod_spec(doc)
    if spec is not None:
        yield from spec.get("initContainers", [])
        yield from spec.get("containers", [])


def _pod_spec(doc: Doc) -> Doc | None:
    if doc["kind"] not in POD_TEMPLATE_KINDS:
        return None
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def render_python(directory: Path) -> list[Doc]:
    """Render a kustomization the way ``kubectl kustomize`` does, for what ours use."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
    assert not unknown, f"{directory}: the test's renderer does not know {sorted(unknown)}"
    docs: list[Doc] = []
    for entry in kust.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            docs += render_python(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kust.get("patches", []):
        ops = yaml.safe_load(patch["patch"])
        hits = [d for d in docs if _targets(d, patch["target"])]
        assert hits, f"{directory}: patch target {patch['target']} matches nothing"
        for doc in hits:
            _json_patch(doc, ops)
    for image in kust.get("images", []):
        for doc in docs:
            for container in _containers(doc):
                name = re.split(r"[:@]", container["image"], maxsplit=1)[0]
                if name == image["name"]:
                    new = image.get("newName", name)
                    container["image"] = f"{new}:{image['newTag']}" if "newTag" in image else new
    if "namespace" in kust:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kust["namespace"]
    return docs


def render_kubectl(directory: Path) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def render(directory: Path) -> list[Doc]:
    return render_kubectl(directory) if shutil.which("kubectl") else render_python(directory)


@pytest.fixture(scope="module", params=sorted(KUSTOMIZATIONS))
def docs(request: pytest.FixtureRequest) -> list[Doc]:
    return render(KUSTOMIZATIONS[request.param])


def _by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _env(container: Doc) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


# --- what the tests check ------------------------------------------------------------------


def secret_leaks(docs: list[Doc]) -> list[str]:
    """Where a rendered manifest holds a secret: a Secret's data, a password or a database URL
    in any string (args, env values, annotations), a storage URL passed as a value."""
    leaks: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")
        elif isinstance(node, str) and any(p.search(node) for p in SECRET_PATTERNS):
            leaks.append(f"{where}: {node!r}")

    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Secret" and (doc.get("data") or doc.get("stringData")):
            leaks.append(f"{name}: a Secret with its data in the manifests")
        walk(doc, name)
        for container in _containers(doc):
            for env in container.get("env", []):
                # The URL only as a file (SEARCH_STORAGE_FILE), never as a value.
                if env["name"] in ("SEARCH_STORAGE", "DATABASE_URL") or (
                    "PASSWORD" in env["name"] and not env["name"].endswith("_FILE")
                ):
                    leaks.append(f"{name}: env {env['name']} holds the secret as a value")
    return leaks


def test_every_manifest_validates_against_the_api_schemas(docs: list[Doc]) -> None:
    assert docs
    for doc in docs:
        # strict: an unknown or misspelt field is an error too.
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validation_catches_a_broken_manifest(docs: list[Doc]) -> None:
    job = copy.deepcopy(_one(docs, "Job", "search-worker"))
    job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_no_secret_in_any_manifest_or_container_argument(docs: list[Doc]) -> None:
    assert secret_leaks(docs) == []
    # ... nor in the files as written (their comments included).
    for path in sorted(DEPLOY.rglob("*.yaml")):
        text = path.read_text()
        assert not [p.pattern for p in SECRET_PATTERNS if p.search(text)], path


def test_the_leak_check_finds_a_planted_secret(docs: list[Doc]) -> None:
    planted = copy.deepcopy(docs)
    worker = _one(planted, "Job", "search-worker")["spec"]["template"]["spec"]["containers"][0]
    worker["args"] += ["--storage", "postgresql://search:hunter2@postgres:5432/search"]
    worker["args"] += ["--storage", "grpc://search-proxy:13000"]  # names no secret
    worker["args"] += ["--storage", "https://user:hunter2@example.org/x"]
    assert [leak.split(": ")[1] for leak in secret_leaks(planted)] == [
        "'postgresql://search:hunter2@postgres:5432/search'",
        "'https://user:hunter2@example.org/x'",
    ]
    planted = copy.deepcopy(docs)
    dashboard = _one(planted, "Deployment", "search-dashboard")
    dashboard["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "POSTGRES_PASSWORD", "value": "hunter2"}
    )
    assert secret_leaks(planted) == [
        "Deployment/search-dashboard: env POSTGRES_PASSWORD holds the secret as a value"
    ]


def test_the_storage_url_comes_from_a_mounted_secret_file(docs: list[Doc]) -> None:
    readers = 0
    for doc in docs:
        spec = _pod_spec(doc)
        if spec is None:
            continue
        secret_volumes = {v["name"] for v in spec.get("volumes", []) if "secret" in v}
        for container in _containers(doc):
            for key in ("SEARCH_STORAGE_FILE", "POSTGRES_PASSWORD_FILE"):
                path = _env(container).get(key)
                if path is None:
                    continue
                readers += 1
                mounts = [
                    m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"])
                ]
                assert mounts and mounts[-1]["name"] in secret_volumes, (doc["kind"], key, path)
    assert readers >= 3  # postgres, the workers, the dashboard (and the proxy)


def test_workers_are_an_indexed_job_of_one_gpu_each(docs: list[Doc]) -> None:
    job = _one(docs, "Job", "search-worker")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] >= 1  # one pod per GPU to use
    pod = spec["template"]["spec"]
    # A killed pod fails and the Job makes a new one for its index.
    assert pod["restartPolicy"] == "Never"
    assert spec["backoffLimitPerIndex"] >= 1
    assert spec["podReplacementPolicy"] == "Failed"
    (worker,) = pod["containers"]
    assert (
        worker["args"][0] == "worker" and worker["args"][worker["args"].index("--gpu") + 1] == "0"
    )
    resources = worker["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources.get("requests", {}).get("nvidia.com/gpu", 1) == 1
    # No other pod takes a GPU.
    for doc in docs:
        for container in _containers(doc):
            if doc is not job:
                assert "nvidia.com/gpu" not in str(container.get("resources")), doc["metadata"]


def test_the_model_cache_is_a_volume_at_hf_home(docs: list[Doc]) -> None:
    hf_home = re.search(r"HF_HOME=(\S+)", (ROOT / "Dockerfile").read_text())
    assert hf_home is not None
    pod = _one(docs, "Job", "search-worker")["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    mounts = [m for m in worker["volumeMounts"] if hf_home.group(1).startswith(m["mountPath"])]
    deepest = max(mounts, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == deepest["name"])
    assert "persistentVolumeClaim" in volume
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert _one(docs, "PersistentVolumeClaim", claim)


def test_grace_period_outlasts_a_hand_back(docs: list[Doc]) -> None:
    from search.worker.isolation import _EXIT_GRACE_S
    from storage._lock import DEFAULT_LOCK_TIMEOUT_S

    pod = _one(docs, "Job", "search-worker")["spec"]["template"]["spec"]
    env = _env(pod["containers"][0])
    # A hand-back waits for the budget lock (held at most SEARCH_LOCK_TIMEOUT s by a stalled
    # holder) and for the trial process to exit, then commits one transaction.
    lock_timeout = float(env.get("SEARCH_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_S))
    assert pod["terminationGracePeriodSeconds"] > lock_timeout + _EXIT_GRACE_S


def test_nothing_is_exposed_outside_the_cluster(docs: list[Doc]) -> None:
    assert not [d["kind"] for d in docs if d["kind"] in EXPOSING_KINDS]
    for service in _by_kind(docs, "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]
        assert "externalIPs" not in service["spec"]
    dashboard = _one(docs, "Service", "search-dashboard")
    assert dashboard["spec"]["type"] == "ClusterIP"
    for doc in docs:
        spec = _pod_spec(doc)
        if spec is not None:
            assert not spec.get("hostNetwork") and not spec.get("hostPID")
            for container in _containers(doc):
                assert all("hostPort" not in p for p in container.get("ports", []))


def test_every_pod_runs_non_root_without_privileges(docs: list[Doc]) -> None:
    image_uid = re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert image_uid is not None
    pods = [d for d in docs if _pod_spec(d) is not None]
    assert len(pods) >= 3
    for doc in pods:
        spec = _pod_spec(doc)
        assert spec is not None
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, doc["metadata"]
        assert context["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        if any(c["image"].startswith("ko-retrieval-search") for c in _containers(doc)):
            assert context["runAsUser"] == int(image_uid.group(1))  # the image's own user
        writable = {v["name"] for v in spec.get("volumes", []) if "secret" not in v}
        for container in _containers(doc):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
            assert sc["readOnlyRootFilesystem"] is True
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in writable, (doc["metadata"]["name"], "/tmp")
            assert container["resources"]["requests"] and container["resources"]["limits"]


def test_postgres_is_a_stateful_set_with_a_claim_and_a_readiness_probe(docs: list[Doc]) -> None:
    sts = _one(docs, "StatefulSet", "postgres")
    assert sts["spec"]["volumeClaimTemplates"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["exec"]["command"][0] == "pg_isready"
    service = _one(docs, "Service", sts["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"


def test_the_proxy_overlay_puts_workers_behind_search_proxy() -> None:
    docs = render(KUSTOMIZATIONS["proxy"])
    args = _one(docs, "Job", "search-worker")["spec"]["template"]["spec"]["containers"][0]["args"]
    url = args[args.index("--storage") + 1]
    match = re.fullmatch(r"grpc://([a-z0-9-]+):(\d+)", url)
    assert match, url
    service = _one(docs, "Service", match.group(1))
    assert int(match.group(2)) in [p["port"] for p in service["spec"]["ports"]]
    proxy = _one(docs, "Deployment", "search-proxy")["spec"]["template"]["spec"]["containers"][0]
    assert proxy["args"][0] == "proxy" and "SEARCH_STORAGE_FILE" in _env(proxy)
    # The base's workers reach PostgreSQL themselves (the URL from the Secret's file).
    base = render(KUSTOMIZATIONS["base"])
    worker = _one(base, "Job", "search-worker")["spec"]["template"]["spec"]["containers"][0]
    assert "--storage" not in worker["args"] and "SEARCH_STORAGE_FILE" in _env(worker)


def _secret_file(pod: Doc, container: Doc, path: str) -> tuple[str, str]:
    """``(Secret name, key)`` of the file ``path`` in ``container``, from a mounted Secret."""
    mounts = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert mounts, path
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert "secret" in volume and mount.get("readOnly"), (path, volume)
    name = path.removeprefix(mount["mountPath"] + "/")
    (key,) = [i["key"] for i in volume["secret"]["items"] if i["path"] == name]
    return volume["secret"]["secretName"], key


def test_the_proxy_speaks_tls_with_a_token_from_a_secret_and_the_workers_use_them() -> None:
    from storage._proxy_security import ENV_TLS_CA
    from storage._proxy_security import ENV_TLS_CERT
    from storage._proxy_security import ENV_TLS_KEY
    from storage._proxy_security import ENV_TOKEN_FILE

    docs = render(KUSTOMIZATIONS["proxy"])
    proxy_pod = _one(docs, "Deployment", "search-proxy")["spec"]["template"]["spec"]
    (proxy,) = proxy_pod["containers"]
    assert "0.0.0.0" in proxy["args"] and "--insecure-public" not in proxy["args"]
    env = _env(proxy)
    served = {k: _secret_file(proxy_pod, proxy, env[k]) for k in (ENV_TLS_CERT, ENV_TLS_KEY)}
    token = _secret_file(proxy_pod, proxy, env[ENV_TOKEN_FILE])
    worker_pod = _one(docs, "Job", "search-worker")["spec"]["template"]["spec"]
    (worker,) = worker_pod["containers"]
    env = _env(worker)
    assert _secret_file(worker_pod, worker, env[ENV_TOKEN_FILE]) == token  # the same token
    ca = _secret_file(worker_pod, worker, env[ENV_TLS_CA])
    # One Secret, made from tools/proxy_certs.sh's files (the overlay's comment says how).
    assert {ca[0], token[0], *(s for s, _ in served.values())} == {"search-proxy-tls"}
    assert ca[1] == "proxy_ca.pem" and token[1] == "proxy_token"
    assert served == {ENV_TLS_CERT: ("search-proxy-tls", "proxy_cert.pem"),
                      ENV_TLS_KEY: ("search-proxy-tls", "proxy_key.pem")}  # fmt: skip
    text = (DEPLOY / "overlays" / "proxy" / "kustomization.yaml").read_text()
    assert "tools/proxy_certs.sh secrets search-proxy" in text
    assert "create secret generic search-proxy-tls" in text


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_the_test_renderer_agrees_with_kubectl(name: str) -> None:
    def keyed(docs: list[Doc]) -> dict[tuple[str, str], Doc]:
        return {(d["kind"], d["metadata"]["name"]): d for d in docs}

    assert keyed(render_python(KUSTOMIZATIONS[name])) == keyed(
        render_kubectl(KUSTOMIZATIONS[name])
    )
