"""Datasets and loaders over the manifests: scenes (joint training), crops (IDNet), test images.

Images are decoded lazily in DataLoader workers; only the small annotation
tables live in memory. Every random choice of an item (flip, for instance) is
drawn from a generator seeded by (seed, epoch, index), so an item looks the
same whichever worker loads it and whenever a run is resumed. Resizing is left
to the model's GeneralizedRCNNTransform (scenes) or done here (IDNet crops).
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.io import ImageReadMode, decode_image
from torchvision.ops import box_iou
from torchvision.transforms.functional import erase

from psearch.data.manifest import Manifests
from psearch.errors import PsearchError
from psearch.imaging import IMAGE_MEAN, cut_crops, hflip_boxes

# A background crop overlaps no annotated person by more than this IoU.
BACKGROUND_MAX_IOU = 0.3
# Candidate background boxes drawn per image before giving up on finding enough.
BACKGROUND_CANDIDATES = 64


DATASET_ROOT_ENV = "PSEARCH_DATASET_ROOT"


def dataset_root(manifests: Manifests) -> Path:
    """The raw dataset directory that `images.path` is relative to.

    $PSEARCH_DATASET_ROOT wins; else dataset.json `root` (relative to the manifests),
    else its `root_abs` when the relative one does not exist.
    """
    override = os.environ.get(DATASET_ROOT_ENV)
    if override:
        return Path(override)
    root = manifests.info.get("root")
    if not root:
        raise PsearchError(f"{manifests.root / 'dataset.json'}: no 'root' entry naming the images")
    root = Path(root)
    resolved = root if root.is_absolute() else (manifests.root / root).resolve()
    # Manifests moved (a copied artifact, another mount point): fall back to where ingest read.
    absolute = manifests.info.get("root_abs")
    if not resolved.is_dir() and absolute and Path(absolute).is_dir():
        return Path(absolute)
    return resolved


def num_train_identities(manifests: Manifests) -> int:
    """C: the training identities, which take the dense ids 0..C-1 (docs/contract.md)."""
    split = np.asarray(manifests.persons.column("split").to_pylist())
    ids = manifests.persons.column("person_id").to_numpy()
    train_ids = ids[split == "train"]
    if len(train_ids) == 0:
        raise PsearchError(f"{manifests.root / 'persons.parquet'}: no training identities")
    if train_ids.max() != len(train_ids) - 1:
        raise PsearchError(
            f"{manifests.root / 'persons.parquet'}: training identities are not 0..C-1"
        )
    return int(len(train_ids))


@dataclass(frozen=True)
class SceneRecord:
    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4] x1y1x2y2 pixels
    labels: np.ndarray  # int64 [N]: 0..C-1 identity, -1 unlabelled


def scene_records(
    manifests: Manifests, split: str, num_classes: int | None = None, require_boxes: bool = False
) -> list[SceneRecord]:
    """One record per image of `split`, in image_id order; checks every image file exists.

    Identities outside 0..num_classes-1 become -1 (unlabelled) when num_classes is given.
    """
    root = dataset_root(manifests)
    images = manifests.images.to_pydict()
    boxes = manifests.boxes
    box_image = boxes.column("image_id").to_numpy()
    coords = np.stack([boxes.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], 1)
    person = boxes.column("person_id").to_numpy().astype(np.int64)
    if num_classes is not None:
        person = np.where((person >= 0) & (person < num_classes), person, -1)
    order = np.argsort(box_image, kind="stable")
    starts = np.searchsorted(box_image[order], images["image_id"], side="left")
    ends = np.searchsorted(box_image[order], images["image_id"], side="right")
    records = []
    for i, image_id in enumerate(images["image_id"]):
        if images["split"][i] != split:
            continue
        rows = order[starts[i] : ends[i]]
        if require_boxes and len(rows) == 0:
            continue
        path = root / images["path"][i]
        if not path.is_file():
            raise PsearchError(f"{path}: image file not found (listed in images.parquet)")
        records.append(
            SceneRecord(
                image_id=int(image_id),
                path=path,
                width=int(images["width"][i]),
                height=int(images["height"][i]),
                boxes=coords[rows].astype(np.float32).reshape(-1, 4),
                labels=person[rows],
            )
        )
    records.sort(key=lambda r: r.image_id)
    if not records:
        raise PsearchError(f"{manifests.root / 'images.parquet'}: no {split} images")
    return records


def read_image(path: Path) -> torch.Tensor:
    """uint8 [3, H, W] RGB."""
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError) as exc:
        raise PsearchError(f"{path}: cannot decode image ({exc})") from None


def _item_rng(seed: int, key: int | tuple[int, int]) -> tuple[int, np.random.Generator]:
    """(index, generator) for a sampler key: an index, or (epoch, index) from EpochSampler."""
    epoch, index = key if isinstance(key, tuple) else (0, key)
    return int(index), np.random.default_rng([seed, epoch, index])


class SceneDataset(Dataset):
    """Scene images with their person boxes: (image float [3,H,W] in 0..1, target dict).

    target: boxes float32 [N,4] (pixels of the original image), labels int64 [N]
    (0..C-1 identities, -1 unlabelled), image_id int. Images without any box are skipped.
    """

    def __init__(
        self,
        manifests: Manifests,
        num_classes: int,
        split: str = "train",
        hflip: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.records = scene_records(manifests, split, num_classes, require_boxes=True)
        self.hflip = hflip
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]):
        index, rng = _item_rng(self.seed, key)
        record = self.records[index]
        image = read_image(record.path)
        boxes = torch.from_numpy(record.boxes.copy())
        if rng.random() < self.hflip:
            image = image.flip(-1)
            boxes = hflip_boxes(boxes, image.shape[-1])
        target = {
            "boxes": boxes,
            "labels": torch.from_numpy(record.labels.copy()),
            "image_id": record.image_id,
        }
        return image.float().div_(255), target


def sample_background_boxes(
    record: SceneRecord, count: int, rng: np.random.Generator
) -> np.ndarray:
    """Up to `count` boxes shaped like this image's persons, overlapping none of them.

    Sizes are the image's person boxes scaled by 0.8-1.2; positions are uniform in the
    image; a candidate is kept when its IoU with every annotated box is below
    BACKGROUND_MAX_IOU (the paper's "random background boxes").
    """
    if count <= 0 or len(record.boxes) == 0:
        return np.zeros((0, 4), np.float32)
    n = BACKGROUND_CANDIDATES
    sizes = record.boxes[:, 2:] - record.boxes[:, :2]
    pick = sizes[rng.integers(0, len(sizes), n)] * rng.uniform(0.8, 1.2, (n, 1))
    w = np.clip(pick[:, 0], 4, record.width)
    h = np.clip(pick[:, 1], 4, record.height)
    x1 = rng.uniform(0, 1, n) * (record.width - w)
    y1 = rng.uniform(0, 1, n) * (record.height - h)
    cand = np.stack([x1, y1, x1 + w, y1 + h], 1).astype(np.float32)
    iou = box_iou(torch.from_numpy(cand), torch.from_numpy(record.boxes)).numpy()
    keep = cand[iou.max(1) < BACKGROUND_MAX_IOU]
    return keep[:count]


class CropDataset(Dataset):
    """IDNet training crops: every labelled box (label = identity 0..C-1) plus about
    `background_ratio` times as many random background boxes (label = C).

    Items are (crop float [3, H, W] in 0..1, label int64): the box plus `context` around it,
    the box resized to height x width (psearch.imaging). The background boxes are drawn
    once, from `seed`, when the dataset is built.

    A DataLoader fetches a whole batch through `__getitems__`, which decodes each scene once
    for all of its crops in the batch and converts only each crop's window to float, so the
    cost per crop follows the crop, not the scene. The batch keeps the sampler's order (crops
    of many scenes, shuffled, as the paper's IDNet batches are) and every item is exactly what
    `__getitem__` gives for its key. Grouping batches by scene would decode less but change
    which crops train together; a crop cache written once would hold every crop (CUHK-SYSU
    at 224 x 224: several GB, quantised to uint8) and go stale with the crop settings.
    """

    def __init__(
        self,
        manifests: Manifests,
        num_classes: int,
        height: int,
        width: int,
        background_ratio: float = 1.0,
        hflip: float = 0.5,
        seed: int = 0,
        context: float = 1.0,
        erase: float = 0.0,
    ) -> None:
        self.records = scene_records(manifests, "train", num_classes, require_boxes=True)
        self.erase = erase
        self.num_classes = num_classes
        self.size = (height, width)
        self.context = context
        self.hflip = hflip
        self.seed = seed
        rng = np.random.default_rng(seed)
        crops: list[tuple[int, np.ndarray, int]] = []  # (record index, box, label)
        for r, record in enumerate(self.records):
            labelled = record.labels >= 0
            for box, label in zip(record.boxes[labelled], record.labels[labelled], strict=True):
                crops.append((r, box, int(label)))
            wanted = int(round(background_ratio * labelled.sum()))
            for box in sample_background_boxes(record, wanted, rng):
                crops.append((r, box, num_classes))
        if not any(label < num_classes for _, _, label in crops):
            raise PsearchError(f"{manifests.root / 'boxes.parquet'}: no labelled training boxes")
        self.image_index = np.array([c[0] for c in crops], np.int64)
        self.boxes = np.stack([c[1] for c in crops]).astype(np.float32)
        self.labels = np.array([c[2] for c in crops], np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[int | tuple[int, int]]) -> list:
        """The items of `keys`, in that order, reading each scene once."""
        items = [_item_rng(self.seed, key) for key in keys]
        by_scene: dict[int, list[int]] = defaultdict(list)  # scene -> positions in `keys`
        for position, (index, _) in enumerate(items):
            by_scene[int(self.image_index[index])].append(position)
        batch: list = [None] * len(keys)
        for scene, positions in by_scene.items():
            image = read_image(self.records[scene].path)
            for position in positions:
                index, rng = items[position]
                # One crop per call: cut_crops converts the window of its boxes, here one crop's.
                crop = cut_crops(image, self.boxes[index], self.size, self.context)[0]
                if rng.random() < self.hflip:
                    crop = crop.flip(-1)
                if self.erase > 0 and rng.random() < self.erase:
                    crop = erase_rectangle(crop, rng)
                batch[position] = (crop, torch.tensor(self.labels[index]))
        return batch


def erase_rectangle(crop: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """`crop` [3, H, W] with one random rectangle of 2-40 % of its area, aspect 0.3-3.3, set to
    the image mean (zero once normalised): random erasing, Zhong et al. 2020's settings."""
    height, width = crop.shape[-2:]
    for _ in range(10):  # a rectangle that does not fit is drawn again, as torchvision does
        area = rng.uniform(0.02, 0.4) * height * width
        aspect = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
        h, w = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < h < height and 0 < w < width:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            fill = torch.tensor(IMAGE_MEAN, dtype=crop.dtype).view(3, 1, 1)
            return erase(crop, top, left, h, w, fill)
    return crop


class TestImageDataset(Dataset):
    """(image_id, image float [3,H,W] in 0..1) for every image of `split`, or of `image_ids`."""

    __test__ = False  # not a pytest class despite the name

    def __init__(
        self, manifests: Manifests, split: str = "test", image_ids: list[int] | None = None
    ) -> None:
        records = scene_records(manifests, split)
        if image_ids is not None:
            wanted = set(int(i) for i in image_ids)
            records = [r for r in records if r.image_id in wanted]
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        return record.image_id, read_image(record.path).float().div_(255)


def list_collate(batch):
    """Scene batches stay lists (images differ in size; the model pads them)."""
    return tuple(list(column) for column in zip(*batch, strict=True))


class EpochSampler(DistributedSampler):
    """DistributedSampler that yields (epoch, index) keys and can start mid-epoch.

    The order depends only on (seed, epoch) as in DistributedSampler, so a resumed run
    that sets the same epoch and `start` (samples of this rank already consumed) sees
    exactly the batches the interrupted run would have seen next.
    """

    def __init__(self, dataset, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=False):
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())[self.start :]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


def seed_worker(worker_id: int) -> None:
    """Keep library RNGs in workers reproducible (items draw their own generators anyway)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    sampler: EpochSampler,
    batch_size: int,
    num_workers: int,
    seed: int,
    collate_fn=None,
    drop_last: bool = True,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader whose worker seeds come from its own generator, not the global RNG,
    so creating it does not disturb the model's random stream (exact resume)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        # Decided on the whole epoch, so a run resumed mid-epoch drops the same last batch.
        drop_last=drop_last and sampler.num_samples >= batch_size,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )
