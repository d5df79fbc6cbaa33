"""IDNet crop loading: crops/s per CPU core, before and after batch fetching, in one run.

Before (issue #13): every crop decoded its whole scene and converted all of it to float.
After: `CropDataset.__getitems__` decodes each scene once per batch and converts only each
crop's window (psearch.imaging.cut_crops). Both load the same batches (the same sampler
keys, one epoch) through a DataLoader with no workers and one torch thread, so the process
CPU time is one core's work: crops/s per core = crops / CPU seconds.

Two settings: the params' pretraining crops (96 x 48 boxes with context 1.5, batch 64) and
the paper's (224 x 224, no context, batch 256). The data: a synthetic preset written by
`psearch synth` and ingested into a temporary directory, or existing manifests. A small
scene set repeats scenes within a batch (decoded once now); at CUHK-SYSU's 11,206 training
scenes a batch's scenes are nearly all distinct, so the last table times the steps of one
crop on a scene resized to 800 x 600 (CUHK-SYSU's typical size), as JPEG: the decode both
versions pay, the whole-scene conversion the old one added, and the windowed cut.

Usage: python benchmarks/bench_crops.py [--preset demo] [--manifests DIR] [--batches 8]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.ops import roi_align

from psearch.config import PretrainConfig
from psearch.data.ingest import ingest
from psearch.data.loaders import (
    CropDataset,
    EpochSampler,
    make_loader,
    num_train_identities,
    read_image,
)
from psearch.data.manifest import read_manifests
from psearch.imaging import IMAGE_MEAN, crop_size, cut_crops
from psearch.synth import synthesize


def whole_scene_crop(image, box, size, context) -> torch.Tensor:
    """The crop as cut before issue #13: the whole scene converted to float for each crop."""
    box = torch.as_tensor(np.asarray(box, np.float32).reshape(1, 4))
    centre = (box[:, :2] + box[:, 2:]) / 2
    half = (box[:, 2:] - box[:, :2]).clamp(min=1.0) * (context / 2)
    fill = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    shifted = image[None].float().div(255.0) - fill
    regions = torch.cat([centre - half, centre + half], dim=1)
    crops = roi_align(shifted, [regions], crop_size(size, context), 1.0, aligned=True)
    return (crops + fill).clamp_(0.0, 1.0)[0]


class PerCropDataset(CropDataset):
    """CropDataset as it was: one item at a time, each decoding and converting its scene."""

    __getitems__ = None  # the DataLoader then fetches item by item

    def __getitem__(self, key):
        index, epoch = (key[1], key[0]) if isinstance(key, tuple) else (key, 0)
        image = read_image(self.records[self.image_index[index]].path)
        crop = whole_scene_crop(image, self.boxes[index], self.size, self.context)
        if np.random.default_rng([self.seed, epoch, index]).random() < self.hflip:
            crop = crop.flip(-1)
        return crop, torch.tensor(self.labels[index])


def manifests_for(preset: str, workdir: Path) -> Path:
    synthesize(workdir / "raw", preset, 0)
    ingest(workdir / "raw", workdir / "manifests", "cuhk-sysu")
    return workdir / "manifests"


def load(dataset: CropDataset, batch_size: int, batches: int) -> tuple[int, float, float, int]:
    """(crops, CPU s, wall s, scenes per batch) over `batches` batches of epoch 0."""
    sampler = EpochSampler(dataset, shuffle=True, seed=0)
    sampler.set_position(0, 0)
    keys = list(sampler)
    scenes = [
        len({int(dataset.image_index[i]) for _, i in keys[b : b + batch_size]})
        for b in range(0, batch_size * batches, batch_size)
    ]
    loader = make_loader(dataset, sampler, batch_size, num_workers=0, seed=0)
    crops, wall, cpu = 0, time.perf_counter(), time.process_time()
    for index, (batch, _) in enumerate(loader):
        crops += len(batch)
        if index + 1 == batches:
            break
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return crops, cpu, wall, round(float(np.mean(scenes)))


def cpu_ms(fn, repeats: int = 20) -> float:
    fn()
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats * 1000


def crop_steps_at_cuhk_size(scene_path: Path, settings) -> None:
    """CPU ms of each step of one crop on an 800 x 600 JPEG scene (a person 360 px tall)."""
    width, height = 800, 600
    scene = Image.open(scene_path).convert("RGB").resize((width, height), Image.BICUBIC)
    encoded = io.BytesIO()
    scene.save(encoded, "JPEG", quality=90)
    data = torch.frombuffer(bytearray(encoded.getvalue()), dtype=torch.uint8)
    image = decode_image(data, mode=ImageReadMode.RGB)
    box = np.array([[320.0, 120.0, 470.0, 480.0]], np.float32)
    print(f"\none crop of an {width} x {height} JPEG scene, CPU ms (1 thread)")
    print(
        f"{'crops':<22}{'decode':>8}{'before: cut':>13}{'after: cut':>12}{'before':>8}{'after':>7}"
    )
    decode = cpu_ms(lambda: decode_image(data, mode=ImageReadMode.RGB))
    for name, size, context, _ in settings:
        before = cpu_ms(
            lambda size=size, context=context: whole_scene_crop(image, box, size, context)
        )
        after = cpu_ms(lambda size=size, context=context: cut_crops(image, box, size, context))
        label = f"{name} {size[0]}x{size[1]} ctx {context}"
        print(
            f"{label:<22}{decode:>8.2f}{before:>13.2f}{after:>12.2f}"
            f"{decode + before:>8.2f}{decode + after:>7.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", help="synthetic preset to write (demo)")
    parser.add_argument("--manifests", type=Path, help="existing manifests instead of --preset")
    parser.add_argument("--batches", type=int, default=8, help="batches per setting (8)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    defaults = PretrainConfig()
    settings = [
        ("params", (defaults.crop_height, defaults.crop_width), defaults.crop_context, 64),
        ("paper", (224, 224), 1.0, 256),
    ]
    with tempfile.TemporaryDirectory() as workdir:
        root = args.manifests or manifests_for(args.preset, Path(workdir))
        manifests = read_manifests(root)
        num_classes = num_train_identities(manifests)
        first = CropDataset(manifests, num_classes, 8, 8)
        record = first.records[0]
        print(
            f"{root}: {len(first)} crops of {len(first.records)} training scenes "
            f"({record.width} x {record.height} px); 1 torch thread, no loader workers"
        )
        print(
            f"{'crops':<22}{'batch':>6}{'scenes/batch':>13}"
            f"{'before crops/s/core':>21}{'after crops/s/core':>20}{'speed-up':>10}"
        )
        for name, size, context, batch in settings:
            rates = []
            for kind in (PerCropDataset, CropDataset):
                dataset = kind(manifests, num_classes, *size, seed=0, context=context)
                crops, cpu, _, scenes = load(dataset, batch, args.batches)
                rates.append(crops / cpu)
            label = f"{name} {size[0]}x{size[1]} ctx {context}"
            print(
                f"{label:<22}{batch:>6}{scenes:>13}{rates[0]:>21.0f}{rates[1]:>20.0f}"
                f"{rates[1] / rates[0]:>9.2f}x"
            )
        crop_steps_at_cuhk_size(first.records[0].path, settings)


if __name__ == "__main__":
    main()
