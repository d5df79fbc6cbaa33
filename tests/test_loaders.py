"""Loaders: scene items and flips, IDNet crops (balance, background IoU), determinism, sampler."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou, roi_align

from psearch.data import loaders
from psearch.data.loaders import (
    BACKGROUND_MAX_IOU,
    CropDataset,
    EpochSampler,
    SceneDataset,
    TestImageDataset,
    dataset_root,
    list_collate,
    make_loader,
    num_train_identities,
    read_image,
)
from psearch.data.manifest import MANIFEST_SCHEMAS, read_manifests, write_parquet
from psearch.errors import PsearchError
from psearch.imaging import IMAGE_MEAN, crop_size, hflip_boxes

W, H = 64, 48


def _write_tables(out, images, boxes, persons):
    tables = {
        "images": images,
        "boxes": boxes,
        "persons": persons,
        "queries": {k: [] for k in MANIFEST_SCHEMAS["queries"].names},
        "galleries": {k: [] for k in MANIFEST_SCHEMAS["galleries"].names},
    }
    for name, columns in tables.items():
        write_parquet(pa.table(columns, schema=MANIFEST_SCHEMAS[name]), out / f"{name}.parquet")
    (out / "dataset.json").write_text(json.dumps({"name": "unit", "root": "../raw"}))


@pytest.fixture
def small_manifests(tmp_path):
    """4 train + 1 test images of W x H whose left half is black and right half white,
    with hand-placed boxes: identities 0..2, one unlabelled person per image."""
    raw = tmp_path / "raw"
    (raw / "Image").mkdir(parents=True)
    pixels = np.zeros((H, W, 3), np.uint8)
    pixels[:, W // 2 :] = 255
    names = [f"s{i}.png" for i in range(5)]
    for name in names:
        Image.fromarray(pixels).save(raw / "Image" / name)
    images = {
        "image_id": list(range(5)),
        "image_name": names,
        "path": [f"Image/{n}" for n in names],
        "width": [W] * 5,
        "height": [H] * 5,
        "split": ["train"] * 4 + ["test"],
    }
    rows = []  # (image_id, x1, y1, x2, y2, person_id)
    for i in range(4):
        rows.append((i, 2, 4, 12, 30, i % 3))
        rows.append((i, 40, 10, 50, 40, -1))
    rows.append((4, 5, 5, 15, 35, 3))
    boxes = {
        "box_id": list(range(len(rows))),
        "image_id": [r[0] for r in rows],
        "x1": [float(r[1]) for r in rows],
        "y1": [float(r[2]) for r in rows],
        "x2": [float(r[3]) for r in rows],
        "y2": [float(r[4]) for r in rows],
        "person_id": [r[5] for r in rows],
        "is_hard": [False] * len(rows),
    }
    persons = {
        "person_id": [0, 1, 2, 3],
        "person_name": ["p0", "p1", "p2", "p3"],
        "split": ["train", "train", "train", "test"],
    }
    out = tmp_path / "manifests"
    out.mkdir()
    _write_tables(out, images, boxes, persons)
    return read_manifests(out)


def test_scene_items_have_boxes_labels_and_unit_range(small_manifests):
    assert num_train_identities(small_manifests) == 3
    ds = SceneDataset(small_manifests, num_classes=3, hflip=0.0)
    assert len(ds) == 4
    image, target = ds[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert target["boxes"].shape == (2, 4)
    assert target["labels"].tolist() == [0, -1]
    images, targets = list_collate([ds[0], ds[1]])
    assert len(images) == 2 and len(targets) == 2


def test_flip_mirrors_image_and_boxes(small_manifests):
    plain = SceneDataset(small_manifests, num_classes=3, hflip=0.0)
    flipped = SceneDataset(small_manifests, num_classes=3, hflip=1.0)
    image, target = plain[1]
    fimage, ftarget = flipped[1]
    assert torch.equal(fimage, image.flip(-1))
    # The left half (black) becomes the right half.
    assert fimage[:, :, : W // 2].min() == 1.0 and fimage[:, :, W // 2 :].max() == 0.0
    assert ftarget["boxes"][0].tolist() == [W - 12, 4, W - 2, 30]
    assert torch.equal(hflip_boxes(ftarget["boxes"], W), target["boxes"])
    # The pixels under a box are the mirrored pixels under the flipped box.
    x1, y1, x2, y2 = (int(v) for v in target["boxes"][0])
    fx1, _, fx2, _ = (int(v) for v in ftarget["boxes"][0])
    assert torch.equal(fimage[:, y1:y2, fx1:fx2], image[:, y1:y2, x1:x2].flip(-1))


def test_flip_is_deterministic_per_epoch_and_index(small_manifests):
    ds = SceneDataset(small_manifests, num_classes=3, hflip=0.5, seed=3)
    draws = [
        [bool(ds[(epoch, i)][1]["boxes"][0, 0] > W / 2) for i in range(4)] for epoch in range(6)
    ]
    again = [
        [bool(ds[(epoch, i)][1]["boxes"][0, 0] > W / 2) for i in range(4)] for epoch in range(6)
    ]
    assert draws == again
    assert any(any(row) for row in draws) and not all(all(row) for row in draws)


def test_crop_dataset_balance_size_and_background_iou(small_manifests):
    ds = CropDataset(small_manifests, num_classes=3, height=32, width=16, background_ratio=2.0)
    labels = ds.labels
    assert (labels < 3).sum() == 4  # every labelled training box, unlabelled ones excluded
    assert (labels == 3).sum() == 8  # background_ratio x as many background boxes
    crop, label = ds[0]
    assert crop.shape == (3, 32, 16) and label.dtype == torch.int64
    for index in np.flatnonzero(labels == 3):
        record = ds.records[ds.image_index[index]]
        iou = box_iou(torch.from_numpy(ds.boxes[index : index + 1]), torch.from_numpy(record.boxes))
        assert iou.max() < BACKGROUND_MAX_IOU
        x1, y1, x2, y2 = ds.boxes[index]
        assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
    # Crops are of the right pixels: identity boxes sit in the black half.
    assert ds[0][0].max() < 1e-6


def test_crop_dataset_is_deterministic_for_a_seed(small_manifests):
    a = CropDataset(small_manifests, 3, 32, 16, seed=1)
    b = CropDataset(small_manifests, 3, 32, 16, seed=1)
    c = CropDataset(small_manifests, 3, 32, 16, seed=2)
    assert np.array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.boxes, c.boxes)


def noisy_scenes(manifests) -> None:
    """Replace the fixture's flat scenes with noise, so crops differ wherever sampling does."""
    rng = np.random.default_rng(0)
    for path in sorted((dataset_root(manifests) / "Image").glob("*.png")):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)


def whole_scene_crop(ds: CropDataset, epoch: int, index: int) -> torch.Tensor:
    """A crop cut as pretraining cut it before batch fetching: from the whole scene in float."""
    path = ds.records[ds.image_index[index]].path
    scene = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    box = torch.from_numpy(ds.boxes[index]).view(1, 4)
    centre = (box[:, :2] + box[:, 2:]) / 2
    half = (box[:, 2:] - box[:, :2]).clamp(min=1.0) * (ds.context / 2)
    fill = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    regions = torch.cat([centre - half, centre + half], dim=1)
    shifted = scene[None].float() / 255 - fill
    size = crop_size(ds.size, ds.context)
    crop = (roi_align(shifted, [regions], size, 1.0, aligned=True) + fill).clamp(0, 1)[0]
    flip = np.random.default_rng([ds.seed, epoch, index]).random() < ds.hflip
    return crop.flip(-1) if flip else crop


def test_crop_batches_are_the_whole_scene_crops_in_sampler_order(small_manifests):
    noisy_scenes(small_manifests)
    ds = CropDataset(small_manifests, 3, 32, 16, background_ratio=3.0, seed=4, context=1.5)
    sampler = EpochSampler(ds, shuffle=True, seed=4)
    sampler.set_position(3, 0)
    keys = list(sampler)
    batch = ds.__getitems__(keys)
    assert len(batch) == len(keys) == len(ds)
    for (epoch, index), (crop, label) in zip(keys, batch, strict=True):
        assert int(label) == ds.labels[index]
        torch.testing.assert_close(crop, whole_scene_crop(ds, epoch, index), atol=1e-5, rtol=0)
        assert torch.equal(crop, ds[(epoch, index)][0])  # one item alone: the same pixels


def test_random_erasing_fills_one_rectangle_with_the_image_mean(small_manifests):
    noisy_scenes(small_manifests)
    plain = CropDataset(small_manifests, 3, 32, 16, seed=4, hflip=0.0)
    erased = CropDataset(small_manifests, 3, 32, 16, seed=4, hflip=0.0, erase=1.0)
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    for key in [(0, 0), (0, 1), (1, 0), (2, 3)]:
        before, after = plain[key][0], erased[key][0]
        changed = (before != after).any(0)
        rows, cols = torch.nonzero(changed, as_tuple=True)
        assert len(rows) > 0
        # One rectangle, 2-40 % of the crop (rounding aside), holding the mean; the rest kept.
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert changed[top:bottom, left:right].float().mean() > 0.9
        assert 0.01 <= (bottom - top) * (right - left) / (32 * 16) <= 0.45
        torch.testing.assert_close(
            after[:, top:bottom, left:right], mean.expand(3, bottom - top, right - left)
        )
        assert torch.equal(erased[key][0], after)  # the same rectangle every time for a key
    assert not torch.equal(erased[(0, 0)][0], erased[(1, 0)][0])  # another epoch, another one


def test_a_crop_batch_decodes_each_scene_once(small_manifests, monkeypatch):
    ds = CropDataset(small_manifests, 3, 32, 16, background_ratio=3.0)
    decoded = []

    def counting_read(path):
        decoded.append(path)
        return read_image(path)

    monkeypatch.setattr(loaders, "read_image", counting_read)
    sampler = EpochSampler(ds, shuffle=True, seed=0)
    loader = make_loader(ds, sampler, batch_size=len(ds), num_workers=0, seed=0)
    crops, labels = next(iter(loader))  # the DataLoader fetches the batch with __getitems__
    assert crops.shape == (len(ds), 3, 32, 16)
    assert len(decoded) == len(set(decoded)) == len(ds.records) < len(ds)
    keys = list(sampler)
    assert torch.equal(labels, torch.as_tensor(ds.labels[[i for _, i in keys]]))


def test_test_image_dataset_lists_test_images(small_manifests):
    ds = TestImageDataset(small_manifests)
    assert len(ds) == 1
    image_id, image = ds[0]
    assert image_id == 4 and image.shape == (3, H, W)
    assert len(TestImageDataset(small_manifests, split="train", image_ids=[1, 3])) == 2


def test_sampler_resumes_mid_epoch_with_the_same_keys(small_manifests):
    ds = SceneDataset(small_manifests, num_classes=3)
    sampler = EpochSampler(ds, shuffle=True, seed=5)
    sampler.set_position(2, 0)
    full = list(sampler)
    sampler.set_position(2, 2)
    assert list(sampler) == full[2:] and len(sampler) == 2
    assert all(epoch == 2 for epoch, _ in full)
    shards = []
    for rank in range(2):
        part = EpochSampler(ds, num_replicas=2, rank=rank, seed=5)
        part.set_position(2, 0)
        shards.append([i for _, i in part])
    assert sorted(shards[0] + shards[1]) == [0, 1, 2, 3]


def test_loader_batches_with_workers_match_in_process(small_manifests):
    ds = SceneDataset(small_manifests, num_classes=3, hflip=0.5)

    def boxes(num_workers):
        sampler = EpochSampler(ds, seed=0)
        loader = make_loader(ds, sampler, 2, num_workers, seed=0, collate_fn=list_collate)
        return [torch.stack([t["boxes"] for t in targets]) for _, targets in loader]

    a, b = boxes(0), boxes(2)
    assert len(a) == 2 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_missing_image_file_is_a_one_line_error(small_manifests, tmp_path):
    (tmp_path / "raw" / "Image" / "s2.png").unlink()
    with pytest.raises(PsearchError, match="s2.png: image file not found"):
        SceneDataset(small_manifests, num_classes=3)


def test_dataset_root_survives_moved_manifests(tiny_manifests, tiny_dataset, tmp_path, monkeypatch):
    """A copied manifests dir (a pipeline artifact mounted elsewhere) still finds the images
    when dataset.json records the absolute root, as the Kubeflow ingest writes it; DVC's
    manifests keep only the relative root, so their hashes do not depend on the checkout."""
    import json
    import shutil

    from psearch.data.loaders import DATASET_ROOT_ENV, dataset_root
    from psearch.data.manifest import read_manifests

    moved = tmp_path / "deeper" / "still" / "manifests"
    shutil.copytree(tiny_manifests, moved)
    info = json.loads((moved / "dataset.json").read_text())
    assert "root_abs" not in info
    assert not dataset_root(read_manifests(moved)).is_dir()  # the relative root, now wrong
    info["root_abs"] = str(tiny_dataset.resolve())
    (moved / "dataset.json").write_text(json.dumps(info))
    assert dataset_root(read_manifests(moved)) == tiny_dataset.resolve()
    monkeypatch.setenv(DATASET_ROOT_ENV, str(tmp_path))
    assert dataset_root(read_manifests(moved)) == tmp_path
