"""`psearch pipeline prepare` against a recording stand-in for the Kubernetes API.

There is no cluster here: a small HTTP server on 127.0.0.1 answers the REST
calls the real `kubernetes` client makes (through a kubeconfig pointing at it)
from an in-memory namespace, and records them. The tests check the calls a
cluster would receive: read before write, create when missing, replace only
when the credentials changed, and plain-words reports of what is missing.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from pipelines.cli import main
from pipelines.prepare import prepare
from psearch.config import load_params

NS = "team-a"
CREDENTIALS = {
    "MLFLOW_TRACKING_URI": "http://mlflow.mlflow.svc:5000",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t",
    "MLFLOW_S3_ENDPOINT_URL": "http://minio.minio.svc:9000",
}


def gpu_node(name: str, gpus: int = 1, taints: list[dict] | None = None) -> dict:
    return {
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.present": "true"}},
        "spec": {"taints": taints or []},
        "status": {"allocatable": {"cpu": "16", "nvidia.com/gpu": str(gpus)}},
    }


class FakeKube:
    """One namespace's secrets and PVCs, plus the cluster's nodes and PersistentVolumes; every
    request recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict]] = []
        self.bodies: list[dict] = []
        self.namespaces = {NS}
        self.secrets: dict[str, dict] = {}
        self.pvcs: dict[str, dict] = {}
        self.nodes: list[dict] = [gpu_node("gpu-1", 2)]
        self.pvs: dict[str, dict] = {}

    def handle(self, method: str, path: str, query: dict, body: dict | None) -> tuple[int, dict]:
        self.calls.append((method, path, query))
        if body is not None:
            self.bodies.append(body)
        parts = path.strip("/").split("/")
        if parts == ["api", "v1", "nodes"]:
            wanted = dict(
                kv.split("=") for kv in query.get("labelSelector", [""])[0].split(",") if kv
            )
            items = [n for n in self.nodes if wanted.items() <= n["metadata"]["labels"].items()]
            return 200, {"kind": "NodeList", "apiVersion": "v1", "metadata": {}, "items": items}
        if parts[:3] == ["api", "v1", "persistentvolumes"] and method == "GET":
            found = self.pvs.get(parts[3])
            return (200, found) if found else (404, _status(404, parts[3]))
        if parts[:3] != ["api", "v1", "namespaces"]:
            return 404, _status(404, path)
        namespace = parts[3]
        if namespace not in self.namespaces:
            return 404, _status(404, f"namespaces {namespace}")
        if len(parts) == 4:
            return 200, {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": namespace}}
        store = {"secrets": self.secrets, "persistentvolumeclaims": self.pvcs}[parts[4]]
        name = parts[5] if len(parts) > 5 else body["metadata"]["name"]
        if method == "GET":
            return (200, store[name]) if name in store else (404, _status(404, name))
        if method == "POST" and name in store:
            return 409, _status(409, name)
        if method == "PUT" and name not in store:
            return 404, _status(404, name)
        if "stringData" in body:  # what the API server does with a Secret's stringData
            body["data"] = {
                k: base64.b64encode(v.encode()).decode() for k, v in body.pop("stringData").items()
            }
        if parts[4] == "persistentvolumeclaims":
            body["status"] = {"phase": "Pending"}
        store[name] = body
        return (201 if method == "POST" else 200), body

    def bind(self, claim: str, volume: str, source: dict) -> None:
        """What a provisioner does: a PersistentVolume with `source` bound to PVC `claim`."""
        self.pvcs[claim]["spec"]["volumeName"] = volume
        self.pvcs[claim]["status"] = {"phase": "Bound"}
        self.pvs[volume] = {
            "kind": "PersistentVolume",
            "apiVersion": "v1",
            "metadata": {"name": volume},
            "spec": {"accessModes": self.pvcs[claim]["spec"]["accessModes"], **source},
        }

    def writes(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _ in self.calls if m != "GET"]


def _status(code: int, what: str) -> dict:
    reason = {404: "NotFound", 409: "AlreadyExists"}[code]
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
            "message": f"{what}: {reason}", "code": code}  # fmt: skip


@pytest.fixture
def kube(tmp_path):
    fake = FakeKube()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlparse(self.path)
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.loads(raw) if raw else None
            status, payload = fake.handle(self.command, url.path, parse_qs(url.query), body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = _serve

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "fake",
                        "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"},
                    }
                ],
                "users": [{"name": "me", "user": {"token": "test-token"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
                "current-context": "fake",
            }
        )
    )
    fake.kubeconfig = str(kubeconfig)
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def params():
    return load_params(None, [])


def test_fresh_namespace_gets_secret_and_pvc(kube, params):
    report = prepare(params, NS, kubeconfig=kube.kubeconfig, environ=CREDENTIALS)
    assert report.problems == []
    assert kube.writes() == [
        ("POST", f"/api/v1/namespaces/{NS}/secrets"),
        ("POST", f"/api/v1/namespaces/{NS}/persistentvolumeclaims"),
        ("POST", f"/api/v1/namespaces/{NS}/persistentvolumeclaims"),
    ]
    secret = kube.secrets["psearch-credentials"]
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == CREDENTIALS
    assert secret["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "psearch"}
    pvc = kube.pvcs["psearch-dataset"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"] == {"storage": "50Gi"}
    # Training checkpoints get their own writable claim: the dataset's must stay read-only.
    ckpt = kube.pvcs["psearch-checkpoints"]
    assert ckpt["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert ckpt["spec"]["resources"]["requests"] == {"storage": "20Gi"}
    # Every write was preceded by a read of the same object.
    reads = [p for m, p, _ in kube.calls if m == "GET"]
    assert f"/api/v1/namespaces/{NS}/secrets/psearch-credentials" in reads
    assert f"/api/v1/namespaces/{NS}/persistentvolumeclaims/psearch-dataset" in reads
    node_call = next(q for m, p, q in kube.calls if p == "/api/v1/nodes")
    assert node_call["labelSelector"] == ["nvidia.com/gpu.present=true"]
    text = "\n".join(report.lines)
    assert "created  secret psearch-credentials" in text and "gpu-1 (2)" in text
    assert "s3cr3t" not in text  # values are never printed
    assert "then make its volume read-only" in text


def test_the_dataset_volume_is_checked_read_only(kube, params):
    """kfp-kubernetes mounts a PVC writable (its PvcMount has no read-only field), so prepare
    checks the volume under the dataset claim: a read-only source passes, else a warning."""
    from kfp.kubernetes import kubernetes_executor_config_pb2 as pb

    fields = {f.name for f in pb.PvcMount.DESCRIPTOR.fields}
    assert not any("read" in f for f in fields), (
        f"kfp-kubernetes now has a read-only PVC mount ({fields}): use it in _dataset"
    )
    prepare(params, NS, kubeconfig=kube.kubeconfig, environ=CREDENTIALS)
    kube.bind("psearch-dataset", "pv-nfs-1", {"nfs": {"server": "nas", "path": "/d"}})
    report = prepare(params, NS, kubeconfig=kube.kubeconfig, environ=CREDENTIALS)
    assert report.problems == []
    warning = next(line for line in report.lines if "pv-nfs-1" in line)
    assert warning.startswith("warning  pvc psearch-dataset: its volume pv-nfs-1 is writable")
    assert ("GET", "/api/v1/persistentvolumes/pv-nfs-1", {}) in kube.calls

    kube.bind(
        "psearch-dataset", "pv-nfs-ro", {"nfs": {"server": "nas", "path": "/d", "readOnly": True}}
    )
    report = prepare(params, NS, kubeconfig=kube.kubeconfig, environ=CREDENTIALS)
    assert "ok       pvc psearch-dataset is on a read-only volume (pv-nfs-ro)" in report.lines
    kube.bind(
        "psearch-dataset", "pv-csi", {"csi": {"driver": "x", "volumeHandle": "h", "readOnly": True}}
    )
    report = prepare(params, NS, kubeconfig=kube.kubeconfig, environ=CREDENTIALS)
    assert "ok       pvc psearch-dataset is on a read-only volume (pv-csi)" in report.lines
    assert not any(line.startswith("warning") for line in report.lines)


def test_second_run_changes_nothing_and_a_changed_credential_replaces_the_secret(kube, params):
    prepare(params, NS, kubeconfig=kube.kubeconfig, environ=CREDENTIALS)
    before = len(kube.writes())
    again = prepare(params, NS, kubeconfig=kube.kubeconfig, environ=CREDENTIALS)
    assert len(kube.writes()) == before
    assert any(line.startswith("ok       secret") for line in again.lines)
    assert any(
        line.startswith("ok       pvc psearch-dataset exists (Pending") for line in again.lines
    )
    rotated = {**CREDENTIALS, "AWS_SECRET_ACCESS_KEY": "rotated"}
    prepare(params, NS, kubeconfig=kube.kubeconfig, environ=rotated)
    assert kube.writes()[-1] == ("PUT", f"/api/v1/namespaces/{NS}/secrets/psearch-credentials")
    data = kube.secrets["psearch-credentials"]["data"]
    assert base64.b64decode(data["AWS_SECRET_ACCESS_KEY"]).decode() == "rotated"


def test_missing_pieces_are_reported_in_plain_words(kube, params):
    kube.nodes = [
        gpu_node("gpu-tainted", 1, [{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}])
    ]
    report = prepare(
        params,
        NS,
        kubeconfig=kube.kubeconfig,
        environ={"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"},
    )
    assert any("is a local store" in p for p in report.problems)
    assert any(
        "none of the 1 node(s) labelled nvidia.com/gpu.present=true" in p for p in report.problems
    )
    assert any("dedicated=ml:NoSchedule" in line for line in report.lines)
    assert ("POST", f"/api/v1/namespaces/{NS}/secrets") not in kube.writes()

    kube.nodes = []
    report = prepare(params, NS, kubeconfig=kube.kubeconfig, environ={})
    assert any("MLFLOW_TRACKING_URI is not set" in p for p in report.problems)
    assert any("no node has the label nvidia.com/gpu.present=true" in p for p in report.problems)

    report = prepare(params, "nope", kubeconfig=kube.kubeconfig, environ=CREDENTIALS)
    assert report.problems == [
        "namespace nope does not exist (create it, or a Kubeflow profile for it)"
    ]


def test_tolerated_taint_and_custom_selector(kube):
    params = load_params(
        None,
        [
            "pipeline.gpu_node_selector={pool: gpu}",
            "pipeline.gpu_tolerations=[{key: dedicated, operator: Equal, value: ml, effect: NoSchedule}]",
        ],
    )
    node = gpu_node("pool-node", 1, [{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}])
    node["metadata"]["labels"] = {"pool": "gpu"}
    kube.nodes = [node]
    report = prepare(params, NS, kubeconfig=kube.kubeconfig, environ=CREDENTIALS)
    assert report.problems == []
    assert any("pool-node (1)" in line for line in report.lines)


def test_cli_prepare_exit_codes(kube, monkeypatch, capsys):
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    args = ["prepare", "--namespace", NS, "--kubeconfig", kube.kubeconfig]
    assert main(args) == 0
    assert "secret psearch-credentials" in capsys.readouterr().out
    kube.nodes = []
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "MISSING  no node has the label" in captured.out
    assert captured.err.strip() == (
        f"error: namespace {NS}: 1 problem(s) to fix before submitting (listed above)"
    )
    missing = Path(kube.kubeconfig).with_name("absent")
    assert main(["prepare", "--namespace", NS, "--kubeconfig", str(missing)]) == 2
    assert "cannot load the Kubernetes config" in capsys.readouterr().err
