"""Test helpers for the multi-node train step: the TrainJob CRD's schema and a fake API server.

`validate_trainjob` checks an object against tests/trainjob/trainjob_schema.yaml (the part of
the Trainer v2 CRD psearch uses), refusing any field the trimmed schema does not list: a real
API server would silently prune a misspelt field, so the test must be the one to object.

`FakeKubernetes` is a Kubernetes API server on 127.0.0.1 that replays a scenario of
tests/trainjob/*.json: for each route ("POST /apis/...", "GET ...", "WATCH ..." for a GET
with watch=true, "DELETE ...") the responses in order, the last one repeated. A response is
{"status", "body"} (JSON), {"status", "echo": metadata} (the request's body with that
metadata merged in, as the server answers a create), {"events": [...]} (a watch stream that
the server then closes) or {"text": "..."} (a pod log). Every request is recorded; one
without a route is answered 404 and listed in `unexpected`.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import yaml

HERE = Path(__file__).resolve().parent / "trainjob"
SCHEMA_FILE = HERE / "trainjob_schema.yaml"
# The CRD's two CEL rules on metadata.name (x-kubernetes-validations at the top of the schema).
NAME_RULE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _closed(schema: Any) -> Any:
    """The schema with every object that lists properties closed to any other."""
    if isinstance(schema, dict):
        schema = {key: _closed(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_closed(item) for item in schema]
    return schema


def trainjob_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_FILE.read_text())


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """Every way `obj` breaks the (closed) trimmed CRD schema, and the CRD's name rules."""
    validator = jsonschema.Draft202012Validator(_closed(trainjob_schema()))
    errors = [
        f"{'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(obj)
    ]
    name = (obj.get("metadata") or {}).get("name")
    if name is not None and (not NAME_RULE.match(name) or len(name) > 63):
        errors.append(f"metadata.name: {name!r} breaks the CRD's name rules")
    return errors


def load_scenario(scenario: str, **values: str) -> dict[str, Any]:
    """A recorded scenario, with {placeholders} (the job's name, the namespace) filled in."""
    text = (HERE / f"{scenario}.json").read_text()
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return json.loads(text)


class FakeKubernetes:
    """The replaying API server (see the module docstring); use as a context manager."""

    def __init__(self, routes: dict[str, list[dict[str, Any]]], hooks: dict | None = None):
        self.routes = {key: list(responses) for key, responses in routes.items()}
        self.hooks: dict[str, Callable[[], None]] = dict(hooks or {})
        self.requests: list[dict[str, Any]] = []
        self.unexpected: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeKubernetes:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def calls(self, route: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["route"] == route]

    def _next(self, route: str) -> dict[str, Any] | None:
        with self.lock:
            queue = self.routes.get(route)
            if not queue:
                return None
            return queue.pop(0) if len(queue) > 1 else queue[0]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet test output
                pass

            def _serve(self, method: str) -> None:
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                watching = method == "GET" and query.get("watch") in ("true", "True", "1")
                route = f"{'WATCH' if watching else method} {url.path}"
                with fake.lock:
                    fake.requests.append({"route": route, "query": query, "body": body})
                if route in fake.hooks:
                    fake.hooks[route]()
                response = fake._next(route)
                if response is None:
                    fake.unexpected.append(route)
                    self._json(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                elif "events" in response:
                    self._events(response["events"])
                elif "text" in response:
                    self._send(200, "text/plain", response["text"].encode())
                elif "echo" in response:
                    created = copy.deepcopy(body)
                    created["metadata"].update(response["echo"])
                    self._json(response["status"], created)
                else:
                    self._json(response["status"], response["body"])

            def _json(self, status: int, obj: Any) -> None:
                self._send(status, "application/json", json.dumps(obj).encode())

            def _send(self, status: int, kind: str, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _events(self, events: list[dict[str, Any]]) -> None:
                # A watch: one JSON event a line, then the server closes the stream.
                data = b"".join(json.dumps(event).encode() + b"\n" for event in events)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = True

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_DELETE(self) -> None:
                self._serve("DELETE")

        return Handler
