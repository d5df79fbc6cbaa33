"""`psearch pipeline submit` against a recording stand-in for the KFP API.

There is no Kubeflow cluster here, so a small HTTP server on 127.0.0.1 plays the
Kubeflow Pipelines v2beta1 REST API: it answers the calls the real kfp.Client
makes (the only stand-in in the project) and records them, so the tests check
what would be sent to a cluster: the experiment looked up then created, the
pipeline uploaded (first time) or given a new version (later), the run started
with the submitter's parameters.

The stand-in is strict where the real server is: every JSON body is deserialised
into kfp_server_api's model class for the route (unknown fields, wrong types, enum
values outside the allowed ones and missing required fields are a 400, as from the
real API), an uploaded package must parse as a KFP PipelineSpec / PlatformSpec
(protobuf), and a run's parameters must be inputs of the version it names.
"""

from __future__ import annotations

import datetime
import email.parser
import email.policy
import json
import re
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import kfp_server_api.models as kfp_models
import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from pipelines.cli import main
from pipelines.submit import split_run_params, submit
from psearch.config import load_params
from psearch.errors import PsearchError

REPO = Path(__file__).resolve().parents[1]
API = "/apis/v2beta1"


class BadRequest(Exception):
    """A request the real KFP API would refuse (HTTP 400)."""


# OpenAPI primitive type names of kfp_server_api's models -> the JSON types they accept.
_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "object": (object,),
}


def strict_model(data, type_name: str, where: str = "body"):
    """`data` (decoded JSON) as an instance of kfp_server_api's `type_name`, refusing what the
    server's schema does not hold. (ApiClient.deserialize drops unknown keys silently, which
    is exactly what must fail here.) Enum models come back as their (checked) string."""
    if type_name.startswith("list["):
        if not isinstance(data, list):
            raise BadRequest(f"{where}: expected a list, got {type(data).__name__}")
        return [strict_model(v, type_name[5:-1], f"{where}[{i}]") for i, v in enumerate(data)]
    if type_name.startswith("dict("):
        if not isinstance(data, dict):
            raise BadRequest(f"{where}: expected an object, got {type(data).__name__}")
        inner = type_name[type_name.index(",") + 1 : -1].strip()
        return {k: strict_model(v, inner, f"{where}.{k}") for k, v in data.items()}
    if type_name == "datetime":
        try:
            return datetime.datetime.fromisoformat(str(data).replace("Z", "+00:00"))
        except ValueError:
            raise BadRequest(f"{where}: {data!r} is not a timestamp") from None
    if type_name in _PRIMITIVES:
        wrong_bool = isinstance(data, bool) and type_name in ("int", "float")
        if wrong_bool or not isinstance(data, _PRIMITIVES[type_name]):
            raise BadRequest(f"{where}: expected {type_name}, got {type(data).__name__}")
        return data
    klass = getattr(kfp_models, type_name)
    if not klass.openapi_types:  # an enum: V2beta1RuntimeState, V2beta1RunStorageState, ...
        if data not in klass.allowable_values:
            raise BadRequest(f"{where}: {data!r} is not one of {klass.allowable_values}")
        return data
    if not isinstance(data, dict):
        raise BadRequest(f"{where}: expected a {type_name} object, got {type(data).__name__}")
    attribute = {json_name: attr for attr, json_name in klass.attribute_map.items()}
    unknown = sorted(set(data) - set(attribute))
    if unknown:
        raise BadRequest(f"{where}: unknown field(s) {unknown} in {type_name}")
    fields = {
        attribute[key]: strict_model(value, klass.openapi_types[attribute[key]], f"{where}.{key}")
        for key, value in data.items()
    }
    try:
        return klass(**fields)  # the model's own setters check what they check
    except ValueError as exc:
        raise BadRequest(f"{where}: {exc}") from None


def _require(model, where: str, *names: str) -> None:
    """Fields the real server requires (the OpenAPI models leave them all optional)."""
    for name in names:
        if getattr(model, name) in (None, ""):
            raise BadRequest(f"{where}: {name} is required")


def _uploaded_package(body: bytes, content_type: str) -> bytes:
    """The `uploadfile` part of a multipart upload, checked to be a compiled KFP pipeline."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    parts = {
        part.get_param("name", header="content-disposition"): part for part in message.iter_parts()
    }
    if "uploadfile" not in parts:
        raise BadRequest(f"upload: no uploadfile part (parts: {sorted(parts)})")
    package = parts["uploadfile"].get_payload(decode=True)
    try:
        documents = list(yaml.safe_load_all(package))
        json_format.ParseDict(documents[0], pipeline_spec_pb2.PipelineSpec())
        for platform in documents[1:]:
            json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())
    except (yaml.YAMLError, json_format.ParseError, IndexError) as exc:
        raise BadRequest(f"upload: not a KFP pipeline package ({exc})") from None
    return package


class FakeKfp:
    """In-memory experiments, pipelines, versions and runs; every request recorded, every
    body checked against the API's models; what was refused is in `refused`."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.experiments: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.runs: dict[str, dict] = {}
        self.refused: list[str] = []

    def handle(
        self, method: str, path: str, query: dict, body: bytes, content_type: str = ""
    ) -> tuple[int, dict]:
        self.calls.append({"method": method, "path": path, "query": query, "body": body})
        try:
            return self._route(method, path, query, body, content_type)
        except BadRequest as exc:
            self.refused.append(str(exc))
            return 400, {"error": str(exc), "code": 3, "message": str(exc)}

    def _route(
        self, method: str, path: str, query: dict, body: bytes, content_type: str
    ) -> tuple[int, dict]:
        if path == f"{API}/healthz":
            return 200, {"multi_user": False}
        if path == f"{API}/experiments" and method == "GET":
            name = _filter_value(query)
            found = [e for e in self.experiments.values() if e["display_name"] == name]
            return 200, {"experiments": found} if found else {}
        if path == f"{API}/experiments" and method == "POST":
            exp = _json(body)
            _require(strict_model(exp, "V2beta1Experiment"), "experiment", "display_name")
            exp["experiment_id"] = f"exp-{len(self.experiments) + 1}"
            self.experiments[exp["experiment_id"]] = exp
            return 200, exp
        if path == f"{API}/pipelines" and method == "GET":
            name = _filter_value(query)
            found = [p for p in self.pipelines.values() if p["display_name"] == name]
            return 200, {"pipelines": found} if found else {}
        if path == f"{API}/pipelines/upload":
            body = _uploaded_package(body, content_type)
            pipeline = {
                "pipeline_id": f"pl-{len(self.pipelines) + 1}",
                "display_name": query["name"][0],
            }
            self.pipelines[pipeline["pipeline_id"]] = pipeline
            self._add_version(pipeline["pipeline_id"], pipeline["display_name"], body)
            return 200, pipeline
        if path == f"{API}/pipelines/upload_version":
            body = _uploaded_package(body, content_type)
            if query.get("pipelineid", [""])[0] not in self.versions:
                raise BadRequest(f"upload_version: no pipeline {query.get('pipelineid')}")
            version = self._add_version(query["pipelineid"][0], query["name"][0], body)
            return 200, version
        match = re.fullmatch(rf"{API}/pipelines/([^/]+)/versions", path)
        if match and method == "GET":
            versions = sorted(self.versions[match[1]], key=lambda v: v["n"], reverse=True)
            return 200, {"pipeline_versions": versions[: int(query.get("page_size", ["10"])[0])]}
        if path == f"{API}/runs" and method == "POST":
            run = _json(body)
            self._check_run(strict_model(run, "V2beta1Run"))
            run["run_id"] = f"run-{len(self.runs) + 1}"
            self.runs[run["run_id"]] = run
            return 200, run
        return 404, {"error": f"no route {method} {path}"}

    def _check_run(self, run) -> None:
        """What the server checks of a new run: names, the version it runs, its parameters."""
        _require(run, "run", "display_name", "experiment_id", "pipeline_version_reference")
        if run.experiment_id not in self.experiments:
            raise BadRequest(f"run: no experiment {run.experiment_id}")
        ref = run.pipeline_version_reference
        _require(ref, "run.pipeline_version_reference", "pipeline_id", "pipeline_version_id")
        versions = {v["pipeline_version_id"]: v for v in self.versions.get(ref.pipeline_id, [])}
        if ref.pipeline_version_id not in versions:
            raise BadRequest(f"run: pipeline {ref.pipeline_id} has no {ref.pipeline_version_id}")
        spec = next(yaml.safe_load_all(versions[ref.pipeline_version_id]["package"]))
        declared = spec["root"]["inputDefinitions"]["parameters"]
        given = (run.runtime_config.parameters if run.runtime_config else None) or {}
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise BadRequest(f"run: {unknown} are not parameters of the pipeline")
        for name, value in given.items():
            if declared[name]["parameterType"] == "STRING" and not isinstance(value, str):
                raise BadRequest(f"run: parameter {name} must be a string")

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


def _json(body: bytes) -> dict:
    try:
        return json.loads(body)
    except ValueError:
        raise BadRequest("body: not JSON") from None


def _filter_value(query: dict) -> str | None:
    raw = query.get("filter", ["{}"])[0]
    predicates = json.loads(raw).get("predicates", [])
    return predicates[0].get("stringValue") if predicates else None


@pytest.fixture
def kfp_server():
    fake = FakeKfp()
    fake.expect_refusals = False  # set by tests that send malformed requests on purpose

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlparse(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, payload = fake.handle(
                self.command,
                url.path,
                parse_qs(url.query),
                body,
                self.headers.get("Content-Type", ""),
            )
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
    assert fake.refused == [] or fake.expect_refusals, f"the fake KFP API refused: {fake.refused}"


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


def _post(host: str, path: str, payload) -> tuple[int, dict]:
    request = urllib.request.Request(
        host + API + path,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_fake_api_refuses_malformed_requests_as_kfp_would(kfp_server, params):
    """The stand-in is no rubber stamp: a run request kfp_server_api's models (or the
    pipeline's parameters) do not accept is a 400, so a malformed submission fails a test."""
    submit(params, host=kfp_server.host, experiment="e", run_name="good")
    good = {k: v for k, v in kfp_server.runs["run-1"].items() if k != "run_id"}
    kfp_server.expect_refusals = True
    bad = {
        "unknown field": {**good, "runtimeConfig": good["runtime_config"]},  # camelCase
        "wrong type": {**good, "display_name": 7},
        "parameters not an object": {**good, "runtime_config": {"parameters": ["x"]}},
        "enum outside the allowed values": {**good, "state": "DONE"},
        "no experiment": {k: v for k, v in good.items() if k != "experiment_id"},
        "no version": {**good, "pipeline_version_reference": {"pipeline_id": "pl-1"}},
        "unknown version": {
            **good,
            "pipeline_version_reference": {"pipeline_id": "pl-1", "pipeline_version_id": "v9"},
        },
        "unknown parameter": {
            **good,
            "runtime_config": {"parameters": {**good["runtime_config"]["parameters"], "lr": "1"}},
        },
        "a string parameter given a number": {
            **good,
            "runtime_config": {"parameters": {"dataset_root": 5}},
        },
    }
    for why, payload in bad.items():
        status, answer = _post(kfp_server.host, "/runs", payload)
        assert status == 400, why
        assert answer["error"], why
    assert len(kfp_server.refused) == len(bad)
    assert "unknown field(s) ['runtimeConfig'] in V2beta1Run" in kfp_server.refused[0]
    assert _post(kfp_server.host, "/experiments", {"name": "x"})[0] == 400
    assert list(kfp_server.runs) == ["run-1"]  # nothing malformed was stored


def test_a_package_that_is_not_a_pipeline_is_refused_on_upload(kfp_server, params, tmp_path):
    kfp_server.expect_refusals = True
    package = tmp_path / "broken.yaml"
    # Passes submit's own look at the parameters; `taskz` is no PipelineSpec field.
    inputs = "inputDefinitions: {parameters: {dataset_root: {parameterType: STRING}}}"
    package.write_text(f"pipelineInfo: {{name: x}}\nroot: {{{inputs}, dag: {{taskz: {{}}}}}}\n")
    with pytest.raises(PsearchError, match="Kubeflow refused the submission"):
        submit(params, host=kfp_server.host, package=package)
    assert "not a KFP pipeline package" in kfp_server.refused[0]
    assert kfp_server.pipelines == {} and kfp_server.runs == {}
