"""pipelines.containers without a container engine: the shim around kfp's DockerRunner.

kfp 2.17 starts each task's container with auto_remove=True and then asks for its exit
status; podman answers that request for a removed container with HTTP 500 and kfp marks
the task failed (Docker answers 404 and kfp assumes success, whatever the exit code).
These tests drive kfp's own DockerTaskHandler against a fake Docker client.
"""

from __future__ import annotations

import os
from pathlib import Path

import docker
import pytest
from kfp import local
from kfp.local import docker_task_handler, status

from pipelines import containers
from pipelines.local import run_local
from psearch.config import load_params
from psearch.errors import PsearchError


class FakeContainer:
    def __init__(self, exit_code: int, removed_on_exit: bool):
        self.exit_code = exit_code
        self.removed_on_exit = removed_on_exit
        self.removed = False

    def logs(self, stream: bool, **_: object):
        assert stream
        yield b"task says hello\n"

    def wait(self):
        if self.removed_on_exit:
            # What podman's Docker API answers once an auto-removed container is gone.
            response = type("Response", (), {"status_code": 500, "reason": "no such container"})
            raise docker.errors.APIError("no such container", response=response())
        return {"StatusCode": self.exit_code}

    def remove(self, force: bool = False):
        self.removed = True


class FakeClient:
    """The parts of docker.DockerClient that kfp's handler and the shim use."""

    def __init__(self, exit_code: int):
        self.exit_code = exit_code
        self.run_kwargs: dict = {}
        self.container: FakeContainer | None = None
        self.images = self
        self.containers = self

    # client.images
    def get(self, name):
        return object()

    def list(self):
        return [type("Image", (), {"tags": ["img:1"], "attrs": {"RepoDigests": []}})()]

    # client.containers
    def run(self, **kwargs):
        self.run_kwargs = kwargs
        self.container = FakeContainer(self.exit_code, removed_on_exit=kwargs["auto_remove"])
        return self.container

    def info(self):
        return {"SecurityOptions": []}

    def close(self):
        pass


def _handler(tmp_path: Path) -> docker_task_handler.DockerTaskHandler:
    return docker_task_handler.DockerTaskHandler(
        image="img:1",
        full_command=["python3", "-c", "pass"],
        pipeline_root=str(tmp_path),
        runner=local.DockerRunner(user="1000:1000"),
    )


def test_kfp_alone_fails_a_successful_task_on_podman(tmp_path, monkeypatch):
    """The race the shim exists for: without it, podman's 500 fails the task."""
    client = FakeClient(exit_code=0)
    monkeypatch.setattr(docker, "from_env", lambda: client)
    with pytest.raises(docker.errors.APIError):
        _handler(tmp_path).run()
    assert client.run_kwargs["auto_remove"] is True


@pytest.mark.parametrize(("exit_code", "expected"), [(0, "SUCCESS"), (3, "FAILURE")])
def test_the_shim_reports_the_real_exit_status_and_removes_the_container(
    tmp_path, monkeypatch, capsys, exit_code, expected
):
    client = FakeClient(exit_code=exit_code)
    monkeypatch.setattr(docker, "from_env", lambda: client)
    with containers.keep_exit_status():
        result = _handler(tmp_path).run()
    assert result == getattr(status.Status, expected)
    assert client.run_kwargs["auto_remove"] is False
    assert client.run_kwargs["user"] == "1000:1000"  # the runner's arguments pass through
    assert client.container.removed
    assert "task says hello" in capsys.readouterr().out


def test_the_shim_is_put_back_afterwards():
    original = docker_task_handler.run_docker_container
    with containers.keep_exit_status():
        assert docker_task_handler.run_docker_container is containers.run_container
    assert docker_task_handler.run_docker_container is original


def test_a_missing_image_that_cannot_be_pulled_names_make_images():
    class NoImages(FakeClient):
        def get(self, name):
            raise docker.errors.ImageNotFound(name)

        def pull(self, name):
            raise docker.errors.APIError("pull access denied", explanation="no registry")

    with pytest.raises(PsearchError, match=r"img:1 .*make images"):
        containers.run_container(NoImages(0), "img:1", ["true"], {})


def test_a_docker_host_that_does_not_answer_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'nothing.sock'}")
    with pytest.raises(PsearchError, match="does not answer"), containers.docker_endpoint(tmp_path):
        pass


def test_an_unknown_runner_is_refused(tmp_path):
    with pytest.raises(PsearchError, match="--runner kubernetes"):
        run_local(load_params(None, []), tmp_path, runner="kubernetes")


@pytest.mark.skipif(os.getuid() != 0, reason="chown needs root")
def test_root_hands_the_writable_mounts_to_the_images_user(tmp_path):
    (tmp_path / "store" / "sub").mkdir(parents=True)
    (tmp_path / "store" / "sub" / "f").write_text("x")
    containers.make_writable(tmp_path / "store")
    owners = {p.stat().st_uid for p in [tmp_path / "store", *(tmp_path / "store").rglob("*")]}
    assert owners == {containers.IMAGE_UID}
    assert containers.container_user() == "1000:1000"
