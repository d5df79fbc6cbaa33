"""Real servers for integration tests: moto's S3 and an MLflow tracking server.

Both listen on 127.0.0.1 on a free port, run in their own process group and
are always stopped at teardown. Import the fixtures into a test module:
`from servers import moto_s3  # noqa: F401`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
DUMMY_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def server(cmd: list[str], port: int, env: dict[str, str], log: Path) -> Iterator[None]:
    """Start `cmd`, wait until it listens on `port`, stop its whole process group afterwards."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory) -> Iterator[dict]:
    """A local S3 (moto) with buckets `psearch-dvc` and `psearch-mlflow`; yields endpoint + env."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, **DUMMY_AWS, **QUIET}
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with server([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], port, env, log):
        s3 = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
        for bucket in ("psearch-dvc", "psearch-mlflow"):
            s3.create_bucket(Bucket=bucket)
        yield {"endpoint": endpoint, "env": {**DUMMY_AWS, **QUIET}, "client": s3}


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": DUMMY_AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": DUMMY_AWS["AWS_SECRET_ACCESS_KEY"],
        "region_name": DUMMY_AWS["AWS_DEFAULT_REGION"],
    }


def s3_keys(s3, bucket: str, prefix: str = "") -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


@pytest.fixture(scope="session")
def mlflow_server(moto_s3, tmp_path_factory) -> Iterator[dict]:
    """`mlflow server` with a SQLite backend and its artifacts in moto's S3; yields uri + env."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {
        **os.environ,
        **moto_s3["env"],
        "MLFLOW_S3_ENDPOINT_URL": moto_s3["endpoint"],
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination", "s3://psearch-mlflow/artifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with server(cmd, port, env, root / "server.log"):
        uri = f"http://127.0.0.1:{port}"
        yield {
            "uri": uri,
            "env": {**moto_s3["env"], "MLFLOW_TRACKING_URI": uri},
            "log": root / "server.log",
        }
