"""DVC remote on S3 (moto): push the pipeline's outputs, wipe them, pull them back unchanged."""

from __future__ import annotations

import shutil

import pytest
from dvc_repo import env, make_repo, run, tree_hashes
from servers import BIN, moto_s3, s3_keys  # noqa: F401

pytestmark = pytest.mark.integration


def test_push_wipe_pull_restores_identical_outputs(tmp_path, moto_s3):  # noqa: F811
    repo = make_repo(tmp_path / "repo", ["synth", "ingest"], {"data": {"preset": "tiny"}})

    environ = env(**moto_s3["env"])
    dvc = str(BIN / "dvc")
    run([dvc, "repro"], repo, environ)
    before = tree_hashes(repo / "data")
    assert any(name.startswith("manifests/") for name in before)
    # The documented setup (docs/local-pipeline.md, "A DVC remote on S3"): a default S3 remote and its endpoint.
    run([dvc, "remote", "add", "-d", "storage", "s3://psearch-dvc/store"], repo, environ)
    run([dvc, "remote", "modify", "storage", "endpointurl", moto_s3["endpoint"]], repo, environ)
    run([dvc, "push"], repo, environ)
    pushed = s3_keys(moto_s3["client"], "psearch-dvc", "store/")
    assert len(pushed) >= len(before)

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data")
    run([dvc, "pull"], repo, environ)
    assert tree_hashes(repo / "data") == before
    status = run([dvc, "status"], repo, environ)
    assert "up to date" in status.stdout
    # Nothing re-ran: the restored outputs satisfy dvc.lock.
    again = run([dvc, "repro"], repo, environ)
    assert "didn't change, skipping" in again.stdout
