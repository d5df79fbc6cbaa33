"""Shared fixtures: the tiny synthetic dataset and its manifests, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Fixtures of the search service's tests (an index over the test scenes, a running server) and
# of the video tests (synthetic footage, a model trained on its street).
pytest_plugins = ["serving_fixtures", "video_fixtures"]

# Tests never reach the internet: no usage telemetry from MLflow or DVC, no version checks.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DVC_NO_VERSION_CHECK", "1")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Root of `psearch synth --preset tiny --seed 0` (CUHK-SYSU layout). Treat as read-only."""
    from psearch.synth import synthesize

    root = tmp_path_factory.mktemp("tiny_dataset") / "cuhk_sysu"
    synthesize(root, preset="tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_manifests(tiny_dataset, tmp_path_factory) -> Path:
    """The manifests `psearch ingest --format cuhk-sysu` writes for `tiny_dataset`. Read-only."""
    from psearch.data.ingest import ingest

    out = tmp_path_factory.mktemp("tiny_manifests") / "manifests"
    ingest(tiny_dataset, out, fmt="cuhk-sysu")
    return out


# --- inference (extract, search, report): a few scenes of two sizes and random-init models ---

INFERENCE_OVERRIDES = [
    "model.min_size=96",
    "model.max_size=160",
    "model.feat_dim=32",
    "model.head_dim=64",
    "model.rpn_pre_nms_top_n_test=200",
    "model.rpn_post_nms_top_n_test=32",
    "model.detections_per_img=10",
    "extract.num_workers=0",
    "tracking.enabled=false",
]
# (image_id, (height, width), [(x1, y1, x2, y2, person_id)]): 2 train, 8 test images.
SCENES = [
    (0, (120, 160), [(10, 10, 40, 90, 0), (80, 20, 110, 100, 1)]),
    (1, (100, 180), [(20, 5, 50, 85, 2), (120, 10, 150, 95, -1)]),
    (2, (120, 160), [(12, 15, 42, 95, 3), (90, 20, 120, 110, -1)]),
    (3, (100, 180), [(30, 10, 60, 90, 4), (100, 12, 132, 92, 3)]),
    (4, (120, 160), [(50, 25, 82, 110, 4)]),
    (5, (100, 180), [(5, 8, 35, 88, 5), (140, 10, 170, 95, 3)]),
    (6, (120, 160), [(70, 15, 100, 100, 5), (20, 20, 48, 96, -1)]),
    (7, (100, 180), []),
    (8, (120, 160), [(100, 30, 130, 112, 4)]),
    (9, (100, 180), [(60, 5, 92, 90, 5)]),
]
# (query_id, image_id, person_id): the query box is that person's box in that image.
QUERIES = [(0, 2, 3), (1, 3, 4), (2, 6, 5)]


def write_scene_dataset(base: Path) -> Path:
    """Raw PNG scenes (noise plus one plain colour per person) and their manifests; returns
    the manifests directory."""
    import json

    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from psearch.data.manifest import MANIFEST_SCHEMAS, write_parquet

    raw, manifests = base / "raw", base / "manifests"
    (raw / "Image" / "SSM").mkdir(parents=True)
    manifests.mkdir()
    rows: dict[str, list[dict]] = {name: [] for name in MANIFEST_SCHEMAS}
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (7, 3))  # one per person id; the last for background people
    for image_id, (height, width), people in SCENES:
        pixels = rng.integers(0, 90, (height, width, 3)).astype(np.uint8)
        name = f"s{image_id}.png"
        for x1, y1, x2, y2, person in people:
            pixels[y1:y2, x1:x2] = colours[person]
            box = dict(x1=x1, y1=y1, x2=x2, y2=y2, person_id=person, is_hard=False)
            rows["boxes"].append(dict(box_id=len(rows["boxes"]), image_id=image_id, **box))
        Image.fromarray(pixels).save(raw / "Image" / "SSM" / name)
        split = "train" if image_id < 2 else "test"
        path = f"Image/SSM/{name}"
        image = dict(image_name=name, path=path, width=width, height=height, split=split)
        rows["images"].append(dict(image_id=image_id, **image))
    for person in range(6):
        split = "train" if person < 3 else "test"
        rows["persons"].append(dict(person_id=person, person_name=f"p{person}", split=split))
    where = {(image_id, p): box for image_id, _, people in SCENES for *box, p in people}
    for query_id, image_id, person in QUERIES:
        x1, y1, x2, y2 = where[(image_id, person)]
        box = dict(x1=x1, y1=y1, x2=x2, y2=y2, occluded=query_id == 0, low_resolution=False)
        rows["queries"].append(dict(query_id=query_id, person_id=person, image_id=image_id, **box))
        for gallery_image in [i for i, _, _ in SCENES if i >= 2 and i != image_id][:5]:
            gt = dict(
                zip(
                    ("gt_x1", "gt_y1", "gt_x2", "gt_y2"),
                    where.get((gallery_image, person), [None] * 4),
                    strict=True,
                )
            )
            row = dict(gallery_size=5, query_id=query_id, image_id=gallery_image, **gt)
            rows["galleries"].append(row)
    for name, schema in MANIFEST_SCHEMAS.items():
        write_parquet(
            pa.Table.from_pylist(rows[name], schema=schema), manifests / f"{name}.parquet"
        )
    info = {
        "name": "scenes",
        "format": "cuhk-sysu",
        "root": str(raw),
        "content_hash": "sha256:scenes",
    }
    (manifests / "dataset.json").write_text(json.dumps(info))
    return manifests


@pytest.fixture(scope="session")
def scene_manifests(tmp_path_factory) -> Path:
    """Manifests of `write_scene_dataset` (2 train + 8 test scenes, 3 queries). Read-only."""
    return write_scene_dataset(tmp_path_factory.mktemp("scenes"))


@pytest.fixture(scope="session")
def inference_params():
    from psearch.config import load_params

    return load_params(None, INFERENCE_OVERRIDES)


@pytest.fixture(scope="session")
def random_models(tmp_path_factory, inference_params) -> dict[str, Path]:
    """{'joint': model.pt, 'idnet': idnet.pt}: seeded random-init models for inference_params."""
    import torch

    from psearch.config import to_dict
    from psearch.models.idnet import build_idnet
    from psearch.models.io import save_model
    from psearch.models.joint import build_joint_net

    out = tmp_path_factory.mktemp("models")
    params = inference_params
    torch.manual_seed(0)
    settings = {"loss": to_dict(params.train.loss), **to_dict(params.model)}
    joint = save_model(out / "model.pt", build_joint_net(3, **settings))
    idnet = save_model(
        out / "idnet.pt",
        build_idnet(3, **settings),
        meta={"crop_height": 64, "crop_width": 32},
    )
    return {"joint": joint, "idnet": idnet}
