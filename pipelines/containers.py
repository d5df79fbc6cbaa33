"""Running the DAG's tasks in the project's images: kfp.local.DockerRunner on a Docker API.

`run-local --runner docker` (pipelines.local) executes each task in its image
(the CPU or CUDA image `make images` builds) through `kfp.local.DockerRunner`,
talking to Docker, or to podman's Docker-compatible service where there is no
Docker (started here on a private unix socket, with docker/containers.conf).

This module owns three things:
  - `docker_endpoint`: the Docker API to use ($DOCKER_HOST, Docker's own socket, or a
    `podman system service` started for the run and stopped after it);
  - `task_mounts`: the volumes a cluster would give the pods (the dataset PVC read-only,
    the checkpoint PVC, the MLflow store), as bind mounts;
  - `keep_exit_status`: a shim around kfp's container start, for the race below.

The race (kfp 2.17, `kfp.local.docker_task_handler.run_docker_container`): kfp
starts every container with `auto_remove=True`, streams its log, then asks for its
exit status. By then the container may be gone: Docker answers 404 (kfp then
*assumes* success, whatever the exit code was) and podman answers HTTP 500 "no
such container" (kfp raises, and the task is marked failed although it
succeeded). The shim runs the same container without auto-removal, waits for the
real exit status, and removes the container itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
from docker.types import Mount
from kfp.local import docker_task_handler

from psearch.errors import PsearchError

REPO = Path(__file__).resolve().parents[1]
# runc and modest ulimits for podman (see the file); used unless CONTAINERS_CONF is set.
CONTAINERS_CONF = REPO / "docker" / "containers.conf"
DOCKER_SOCKET = Path("/var/run/docker.sock")
# The non-root user of both images (docker/Dockerfile*: useradd --uid 1000).
IMAGE_UID = 1000
# How long a starting podman service may take to answer.
SERVICE_TIMEOUT_S = 30.0


def ensure_image(client: docker.DockerClient, image: str) -> str:
    """The image's full name once it is here (pulled if it is not); a one-line error else."""
    image = docker_task_handler.add_latest_tag_if_not_present(image)
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        try:
            client.images.pull(image)
        except docker.errors.APIError as exc:
            raise PsearchError(
                f"image {image} is neither here nor pullable ({exc.explanation or exc}); "
                "build it with `make images`"
            ) from None
    return image


def run_container(
    client: docker.DockerClient,
    image: str,
    command: list[str],
    volumes: dict[str, Any],
    **container_run_args: Any,
) -> int:
    """kfp's `run_docker_container` without auto_remove: the real exit status, then removal.

    Same signature and output as kfp's (the task's log is printed as it comes)."""
    image = ensure_image(client, image)
    container_run_args.pop("auto_remove", None)
    container = client.containers.run(
        image=image,
        command=command,
        detach=True,
        stdout=True,
        stderr=True,
        volumes=volumes,
        auto_remove=False,
        **container_run_args,
    )
    try:
        for chunk in container.logs(stream=True, follow=True):
            print(chunk.decode(errors="replace"), end="")
        return int(container.wait()["StatusCode"])
    finally:
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True)


@contextlib.contextmanager
def keep_exit_status() -> Iterator[None]:
    """While open, kfp.local's DockerRunner starts containers through `run_container`.

    DockerTaskHandler looks `run_docker_container` up in its module at each call, so
    replacing that name is enough; it is put back on exit."""
    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = run_container
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original


def _answers(base_url: str) -> bool:
    try:
        client = docker.DockerClient(base_url=base_url, timeout=5)
    except docker.errors.DockerException:
        return False
    try:
        return bool(client.ping())
    except (docker.errors.DockerException, OSError):
        return False
    finally:
        client.close()


@contextlib.contextmanager
def _podman_service(workdir: Path) -> Iterator[str]:
    """`podman system service` on a private socket for the length of the run."""
    # A unix socket path must stay under ~107 bytes: a short temporary directory, not workdir.
    sockdir = Path(tempfile.mkdtemp(prefix="psearch-podman-"))
    url = f"unix://{sockdir / 'podman.sock'}"
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    log = open(workdir / "podman-service.log", "wb")  # noqa: SIM115 (closed below)
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", url],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + SERVICE_TIMEOUT_S
        while not _answers(url):
            if service.poll() is not None or time.monotonic() > deadline:
                raise PsearchError(
                    f"podman system service did not start (see {workdir / 'podman-service.log'})"
                )
            time.sleep(0.2)
        yield url
    finally:
        service.terminate()
        try:
            service.wait(timeout=10)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
        log.close()
        shutil.rmtree(sockdir, ignore_errors=True)


@contextlib.contextmanager
def docker_endpoint(workdir: Path) -> Iterator[str]:
    """The Docker API to run the tasks on; set as DOCKER_HOST while the block runs."""
    given = os.environ.get("DOCKER_HOST")
    if given:
        if not _answers(given):
            raise PsearchError(f"DOCKER_HOST={given} does not answer")
        yield given
        return
    if DOCKER_SOCKET.exists() and _answers(f"unix://{DOCKER_SOCKET}"):
        url = f"unix://{DOCKER_SOCKET}"
        context: contextlib.AbstractContextManager[str] = contextlib.nullcontext(url)
    elif shutil.which("podman"):
        context = _podman_service(workdir)
    else:
        raise PsearchError(
            "--runner docker: no Docker daemon answers and podman is not installed "
            "(Debian: apt-get install podman runc)"
        )
    with context as url:
        os.environ["DOCKER_HOST"] = url
        try:
            yield url
        finally:
            os.environ.pop("DOCKER_HOST", None)


def bind(source: Path, target: str, *, read_only: bool = False) -> Mount:
    """A bind mount: what a PVC becomes on one machine."""
    return Mount(target=target, source=str(source), type="bind", read_only=read_only)


def container_user() -> str:
    """Tasks run as the images' non-root user, or as the caller when the caller is not root
    (so that what they write stays the caller's)."""
    uid = os.getuid()
    return f"{IMAGE_UID}:{IMAGE_UID}" if uid == 0 else f"{uid}:{os.getgid()}"


def make_writable(*dirs: Path) -> None:
    """Hand directories the tasks write to over to their user, as a PVC's fsGroup would."""
    if os.getuid() != 0:
        return
    for top in dirs:
        for path in [top, *top.rglob("*")]:
            os.chown(path, IMAGE_UID, IMAGE_UID, follow_symlinks=False)
