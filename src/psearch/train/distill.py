"""Distillation from IDNet (`train.distill_weight`): the feature each training box is pulled to.

IDNet's weights initialise the joint net, but in whole scenes the same weights give features
unlike IDNet's on crops (docs/demo-quality.md: a cosine of 0.38 at transfer), and joint training
relearns them from sparse labels. The joint net's loss_distill instead pulls each RoI on a
person towards IDNet's feature of that person's crop, for unlabelled people too.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from psearch.data.loaders import SceneRecord, read_image
from psearch.imaging import cut_crops
from psearch.models.idnet import IDNet


@torch.no_grad()
def teacher_features(
    teacher: IDNet, records: Sequence[SceneRecord], crop_size: tuple[int, int], device
) -> dict[int, torch.Tensor]:
    """image_id -> [N, D]: IDNet's feature of each of the image's boxes, in the records' box
    order. Each is the normalised mean over the crop and its mirror image, so one table holds
    for flipped and unflipped scenes (the boxes keep their order when a scene is flipped)."""
    teacher.eval().to(device)
    table = {}
    for record in records:
        crops = cut_crops(
            read_image(record.path).to(device), record.boxes, crop_size, teacher.context
        )
        both = teacher.features(crops).float() + teacher.features(crops.flip(-1)).float()
        table[record.image_id] = F.normalize(both, dim=1)
    print(
        f"train: IDNet features of {sum(len(t) for t in table.values())} training boxes "
        f"(the distillation targets)",
        file=sys.stderr,
        flush=True,
    )
    return table


class TeacherForward:
    """The training step's forward with each target's "teacher" rows added. The table is
    made on the first step, on the training device."""

    def __init__(self, forward, teacher: IDNet, records, crop_size: tuple[int, int]) -> None:
        self.forward = forward
        self.teacher = teacher
        self.records = records
        self.crop_size = crop_size
        self.table: dict[int, torch.Tensor] | None = None

    def __call__(self, model, batch, device: torch.device):
        if self.table is None:
            self.table = teacher_features(self.teacher, self.records, self.crop_size, device)
        for target in batch[1]:
            target["teacher"] = self.table[int(target["image_id"])]
        return self.forward(model, batch, device)
