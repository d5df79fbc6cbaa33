"""`psearch pipeline submit` against a recording stand-in for the KFP API.

There is no Kubeflow cluster here, so a small HTTP server on 127.0.0.1 plays the
Kubeflow Pipelines v2beta1 REST API: it answers the calls the real kfp.Client
makes (the only stand-in in the project) and records them, so the tests check
what would be sent to a cluster: the experiment looked up then created, the
pipeline uploaded (first time) or given a new version (later), the run started
with the submitter's parameters.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from pipelines.cli import main
from pipelines.submit import split_run_params, submit
from psearch.config import load_params
from psearch.errors import PsearchError

REPO = Path(__file__).resolve().parents[1]
API = "/apis/v2beta1"


class FakeKfp:
    """In-memory experiments, pipelines, versions and runs; every request recorded."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.experiments: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.runs: dict[str, dict] = {}

    def handle(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, dict]:
        self.calls.append({"method": method, "path": path, "query": query, "body": body})
        if path == f"{API}/healthz":
            return 200, {"multi_user": False}
        if path == f"{API}/experiments" and method == "GET":
            name = _filter_value(query)
            found = [e for e in self.experiments.values() if e["display_name"] == name]
            return 200, {"experiments": found} if found else {}
        if path == f"{API}/experiments" and method == "POST":
            exp = json.loads(body)
            exp["experiment_id"] = f"exp-{len(self.experiments) + 1}"
            self.experiments[exp["experiment_id"]] = exp
            return 200, exp
        if path == f"{API}/pipelines" and method == "GET":
            name = _filter_value(query)
            found = [p for p in self.pipelines.values() if p["display_name"] == name]
            return 200, {"pipelines": found} if found else {}
        if path == f"{API}/pipelines/upload":
            pipeline = {
                "pipeline_id": f"pl-{len(self.pipelines) + 1}",
                "display_name": query["name"][0],
            }
            self.pipelines[pipeline["pipeline_id"]] = pipeline
            self._add_version(pipeline["pipeline_id"], pipeline["display_name"], body)
            return 200, pipeline
        if path == f"{API}/pipelines/upload_version":
            version = self._add_version(query["pipelineid"][0], query["name"][0], body)
            return 200, version
        match = re.fullmatch(rf"{API}/pipelines/([^/]+)/versions", path)
        if match and method == "GET":
            versions = sorted(self.versions[match[1]], key=lambda v: v["n"], reverse=True)
            return 200, {"pipeline_versions": versions[: int(query.get("page_size", ["10"])[0])]}
        if path == f"{API}/runs" and method == "POST":
            run = json.loads(body)
            run["run_id"] = f"run-{len(self.runs) + 1}"
            self.runs[run["run_id"]] = run
            return 200, run
        return 404, {"error": f"no route {method} {path}"}

    def _add_version(self, pipeline_id: str, name: str, body: bytes) -> dict:
        versions = self.versions.setdefault(pipeline_id, [])
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": f"{pipeline_id}-v{len(versions) + 1}",
            "display_name": name,
            "n": len(versions),
            "package": body,
        }
        versions.append(version)
        return {k: v for k, v in version.items() if k != "package"}

    def paths(self) -> list[str]:
        return [f"{c['method']} {c['path']}" for c in self.calls]


def _filter_value(query: dict) -> str | None:
    raw = query.get("filter", ["{}"])[0]
    predicates = json.loads(raw).get("predicates", [])
    return predicates[0].get("stringValue") if predicates else None


@pytest.fixture
def kfp_server():
    fake = FakeKfp()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlparse(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, payload = fake.handle(self.command, url.path, parse_qs(url.query), body)
            data = json.dumps(payload, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.host = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def params():
    return load_params(REPO / "params.yaml", ["train.lr=0.02"])


def test_first_submit_creates_experiment_uploads_and_runs(kfp_server, params):
    result = submit(
        params,
        host=kfp_server.host,
        experiment="psearch-tests",
        run_name="first",
        arguments={"dataset_root": "/mnt/dataset/PRW"},
    )
    assert result["run_id"] == "run-1"
    assert result["url"] == f"{kfp_server.host}/#/runs/details/run-1"
    calls = kfp_server.paths()
    # Experiment looked up by name, missing, so created; then the pipeline likewise.
    assert calls.index(f"GET {API}/experiments") < calls.index(f"POST {API}/experiments")
    assert calls.index(f"GET {API}/pipelines") < calls.index(f"POST {API}/pipelines/upload")
    assert f"POST {API}/pipelines/upload_version" not in calls
    assert calls[-1] == f"POST {API}/runs"
    assert list(kfp_server.experiments.values())[0]["display_name"] == "psearch-tests"
    # The uploaded package is the compiled DAG.
    package = kfp_server.versions["pl-1"][0]["package"]
    assert b"pipelineInfo" in package and b"comp-extract-merge" in package
    run = kfp_server.runs["run-1"]
    assert run["display_name"] == "first"
    assert run["experiment_id"] == "exp-1"
    assert run["pipeline_version_reference"] == {
        "pipeline_id": "pl-1",
        "pipeline_version_id": "pl-1-v1",
    }
    arguments = run["runtime_config"]["parameters"]
    assert arguments["dataset_root"] == "/mnt/dataset/PRW"
    sent = json.loads(arguments["params_json"])
    assert sent["train"]["lr"] == 0.02 and "pipeline" not in sent


def test_second_submit_reuses_experiment_and_adds_a_version(kfp_server, params):
    submit(params, host=kfp_server.host, experiment="e", run_name="one")
    submit(params, host=kfp_server.host, experiment="e", run_name="two", version_name="v-two")
    calls = kfp_server.paths()
    assert calls.count(f"POST {API}/experiments") == 1
    assert calls.count(f"POST {API}/pipelines/upload") == 1
    assert calls.count(f"POST {API}/pipelines/upload_version") == 1
    upload = next(c for c in kfp_server.calls if c["path"].endswith("upload_version"))
    assert upload["query"]["name"] == ["v-two"] and upload["query"]["pipelineid"] == ["pl-1"]
    second = kfp_server.runs["run-2"]
    assert second["pipeline_version_reference"]["pipeline_version_id"] == "pl-1-v2"
    assert second["experiment_id"] == "exp-1"


def test_cli_submit_prints_the_run_url_and_takes_params(kfp_server, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code = main(
        [
            "submit", "--host", kfp_server.host, "--experiment", "cli",
            "--param", "train.epochs=7", "--param", "dataset_root=/data/cuhk",
            "--set", "pretrain.lr=0.5",
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"run run-1 started: {kfp_server.host}/#/runs/details/run-1"]
    arguments = kfp_server.runs["run-1"]["runtime_config"]["parameters"]
    sent = json.loads(arguments["params_json"])
    assert (sent["train"]["epochs"], sent["pretrain"]["lr"]) == (7, 0.5)
    assert arguments["dataset_root"] == "/data/cuhk"


def test_a_compiled_package_can_be_submitted_as_is(kfp_server, params):
    package = REPO / "pipelines" / "person_search.yaml"
    submit(params, host=kfp_server.host, package=package)
    uploaded = kfp_server.versions["pl-1"][0]["package"]
    assert package.read_bytes() in uploaded  # the multipart body carries the file unchanged


def test_bad_submissions_fail_before_anything_is_sent(kfp_server, params, capsys):
    with pytest.raises(PsearchError, match="--param dataset_rot: not a pipeline parameter"):
        submit(params, host=kfp_server.host, arguments={"dataset_rot": "/x"})
    with pytest.raises(PsearchError, match="unreachable"):
        submit(params, host="http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(PsearchError, match="expected an http"):
        submit(params, host="kfp.example.com")
    assert [c for c in kfp_server.calls if c["method"] == "POST"] == []
    code = main(["submit", "--host", kfp_server.host, "--param", "train.lrr=1"])
    assert code == 2
    assert "unknown parameter train.lrr" in capsys.readouterr().err
    assert kfp_server.runs == {}


def test_split_run_params():
    assert split_run_params(["a.b=1", "dataset_root=/x=y"]) == (["a.b=1"], {"dataset_root": "/x=y"})
    with pytest.raises(PsearchError, match="expected NAME=VALUE"):
        split_run_params(["novalue"])
    with pytest.raises(PsearchError, match="--param params_json"):
        split_run_params(["params_json={}"])
