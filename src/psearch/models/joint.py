"""The joint detection + identification network (Xiao et al. 2016), from torchvision parts.

image -> GeneralizedRCNNTransform (resize, normalise, batch) -> trunk (stride 16)
      -> RegionProposalNetwork (512-channel 3x3 conv, 9 anchors per location)
      -> RoI pooling of the proposals -> roi_head (fc6 -> fc7)
      -> det_score (person / background softmax), box_regressor (second box regression),
         embedding (fc8, L2-normalised re-id feature) -> identity loss (rss / softmax / oim).

At test time a box's feature can be the normalised mean over several views of its image
(`test_scale_factors` x `test_flip`): detection always runs once, at `min_size`.

Proposals are detached (torchvision's RPN does so), so the re-id and detection losses of the
RoI branch reach the shared trunk but never the proposal network's head.

The network takes plain keyword arguments named as the ``model`` params (``build_joint_net(C,
**dataclasses.asdict(params.model), loss=...)``); its test-time settings (image scale, proposal
counts, score threshold, NMS, detections per image) are attributes that can be set afterwards.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops

from psearch.imaging import IMAGE_MEAN, IMAGE_STD, hflip_boxes
from psearch.models.person_net import PersonNet

ROI_FG_IOU = 0.5  # a RoI is foreground from this IoU with a ground-truth box (py-faster-rcnn)
# The test-time settings: attributes that can be set on a built net (extraction takes them
# from the params, whatever the model was trained with).
INFERENCE_SETTINGS = (
    "min_size",
    "max_size",
    "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_test",
    "rpn_nms_thresh",
    "box_score_thresh",
    "box_nms_thresh",
    "detections_per_img",
    "test_scale_factors",
    "test_flip",
)


def _keyword_only(function: Any) -> tuple[str, ...]:
    """The names of `function`'s keyword-only parameters, in order."""
    parameters = inspect.signature(function).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


class RPNHead512(nn.Module):
    """torchvision's RPNHead with the paper's 512-channel 3x3 conv instead of in_channels."""

    def __init__(self, in_channels: int, num_anchors: int, mid_channels: int = 512) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1)
        # One logit per anchor: the sigmoid form of the paper's two-way proposal softmax.
        self.cls_logits = nn.Conv2d(mid_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(mid_channels, num_anchors * 4, kernel_size=1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        hidden = [F.relu(self.conv(feature)) for feature in x]
        # float32 outputs: the RPN decodes proposals in the deltas' dtype (BoxCoder casts the
        # anchors to it), so bf16 deltas would quantise every proposal's coordinates.
        logits = [self.cls_logits(h).float() for h in hidden]
        return logits, [self.bbox_pred(h).float() for h in hidden]


class MultiScaleTransform(GeneralizedRCNNTransform):
    """torchvision's resize-and-normalise step, with multi-scale training: when `train_sizes`
    is set, each training image's shorter side is drawn from it. torchvision draws from
    `min_size`, whose last entry is also the test scale, so the two could not differ."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_sizes: tuple[int, ...] = ()

    def torch_choice(self, k: list[int]) -> int:
        # Called only for a training image's scale (GeneralizedRCNNTransform.resize).
        return super().torch_choice(list(self.train_sizes) or k)


class _PartSetting:
    """A net attribute that reads and writes one setting of a torchvision part: attribute
    ``attr`` of submodule ``part``, or its entry ``key`` (torchvision's RPN keeps its proposal
    counts in private {"training": n, "testing": n} dicts, with no public setter)."""

    def __init__(self, part: str, attr: str, key: str | None = None) -> None:
        self.part, self.attr, self.key = part, attr, key

    def __get__(self, net: nn.Module | None, owner: type | None = None) -> Any:
        if net is None:
            return self
        value = getattr(getattr(net, self.part), self.attr)
        return value if self.key is None else value[self.key]

    def __set__(self, net: nn.Module, value: Any) -> None:
        holder = getattr(net, self.part)
        if self.key is None:
            setattr(holder, self.attr, value)
        else:
            getattr(holder, self.attr)[self.key] = value


class JointNet(PersonNet):
    """Detection + re-id in one network; see the module docstring for the layout.

    Keyword arguments are named as the ``model`` params; ``person_net`` takes PersonNet's
    (backbone, backbone_weights, feat_dim, roi_op, roi_size, head_dim, freeze_blocks,
    batch_norm, loss, load_weights).
    The INFERENCE_SETTINGS are attributes too: setting one changes what the next forward does.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        anchor_sizes: Sequence[int] = (32, 64, 128),
        anchor_ratios: Sequence[float] = (1.0, 2.0, 3.0),
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_train: int = 300,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_test: int = 100,
        rpn_nms_thresh: float = 0.7,
        rpn_batch_size_per_image: int = 256,
        roi_batch_size_per_image: int = 128,
        roi_positive_fraction: float = 0.5,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.4,
        detections_per_img: int = 100,
        min_size: int = 288,
        max_size: int = 480,
        test_scale_factors: Sequence[float] = (0.89, 1.0, 1.11),
        test_flip: bool = True,
        **person_net: Any,
    ) -> None:
        # The keyword arguments as given (the keyword-only ones, in the signature's order),
        # for model_settings: a saved model rebuilds from them.
        given = locals()
        detector = {name: given[name] for name in DETECTOR_SETTINGS}  # (defined below)
        super().__init__(num_classes, **person_net)
        detector["anchor_sizes"] = list(anchor_sizes)
        detector["anchor_ratios"] = list(anchor_ratios)
        self._detector_settings = detector
        self.transform = MultiScaleTransform(
            min_size, max_size, IMAGE_MEAN, IMAGE_STD, size_divisible=32
        )
        anchors = AnchorGenerator(
            sizes=(tuple(anchor_sizes),), aspect_ratios=(tuple(anchor_ratios),)
        )
        self.rpn = RegionProposalNetwork(
            anchors,
            RPNHead512(self.backbone.out_channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=rpn_batch_size_per_image,
            positive_fraction=0.5,
            pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            post_nms_top_n={
                "training": rpn_post_nms_top_n_train,
                "testing": rpn_post_nms_top_n_test,
            },
            nms_thresh=rpn_nms_thresh,
        )
        width = self.roi_head.out_features
        self.det_score = nn.Linear(width, 2)  # background, person
        self.box_regressor = nn.Linear(width, 4)  # class-agnostic: one foreground class
        self._add_identity_head()
        nn.init.normal_(self.det_score.weight, std=0.01)
        nn.init.normal_(self.box_regressor.weight, std=0.001)
        for layer in (self.det_score, self.box_regressor):
            nn.init.zeros_(layer.bias)
        self.box_coder = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.matcher = det_utils.Matcher(ROI_FG_IOU, ROI_FG_IOU, allow_low_quality_matches=False)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(
            roi_batch_size_per_image, roi_positive_fraction
        )
        self.box_score_thresh = box_score_thresh
        self.box_nms_thresh = box_nms_thresh
        self.detections_per_img = detections_per_img
        self.test_scale_factors = test_scale_factors
        self.test_flip = test_flip
        # Training only (psearch.train.joint sets it): weight of the loss that pulls the
        # features of RoIs on a person towards that person's IDNet feature, given in the
        # targets as "teacher" ([N, D], one row per box); 0 = no such loss.
        self.distill_weight = 0.0
        self.distill_iou = ROI_FG_IOU  # only RoIs at least this close to their box are distilled

    # ------------------------------------------------------------------ settings

    # The test-time settings torchvision's parts hold: the transform's image scale (a tuple
    # of sizes to pick from in training; one here) and the RPN's proposal counts and NMS.
    @property
    def min_size(self) -> int:
        return self.transform.min_size[-1]

    @min_size.setter
    def min_size(self, value: int) -> None:
        self.transform.min_size = (value,)

    @property
    def train_sizes(self) -> tuple[int, ...]:
        """The shorter sides that training draws from, one per image (multi-scale training);
        () = min_size only. Test time always uses min_size."""
        return self.transform.train_sizes

    @train_sizes.setter
    def train_sizes(self, sizes: Sequence[int]) -> None:
        self.transform.train_sizes = tuple(int(size) for size in sizes)

    @property
    def test_scale_factors(self) -> list[float]:
        """Scales (x min_size) whose features a box's test feature averages; [] = min_size."""
        return self._test_scale_factors

    @test_scale_factors.setter
    def test_scale_factors(self, factors: Sequence[float]) -> None:
        self._test_scale_factors = [float(factor) for factor in factors]

    def _test_views(self) -> list[tuple[float, bool]]:
        """(scale factor, mirrored) of every view a test feature averages over."""
        flips = (False, True) if self.test_flip else (False,)
        return [(scale, flip) for scale in self.test_scale_factors or [1.0] for flip in flips]

    max_size = _PartSetting("transform", "max_size")
    rpn_pre_nms_top_n_test = _PartSetting("rpn", "_pre_nms_top_n", "testing")
    rpn_post_nms_top_n_test = _PartSetting("rpn", "_post_nms_top_n", "testing")
    rpn_nms_thresh = _PartSetting("rpn", "nms_thresh")

    def set_inference_settings(self, **settings: Any) -> None:
        """Set test-time settings by name (any of INFERENCE_SETTINGS)."""
        unknown = sorted(set(settings) - set(INFERENCE_SETTINGS))
        if unknown:
            raise TypeError(f"set_inference_settings: {unknown[0]!r} is not an inference setting")
        for name, value in settings.items():
            setattr(self, name, value)

    @property
    def model_settings(self) -> dict[str, Any]:
        """The network's keyword arguments, with the inference settings as they are now."""
        detector = {
            name: getattr(self, name) if name in INFERENCE_SETTINGS else value
            for name, value in self._detector_settings.items()
        }
        return {**super().model_settings, **detector}

    # ------------------------------------------------------------------ shared pieces

    def _fc7(
        self, feature_map: torch.Tensor, boxes: list[torch.Tensor], image_size: tuple[int, int]
    ) -> torch.Tensor:
        return self.roi_head(self.pool(feature_map, boxes, image_size))

    def box_features(
        self, feature_map: torch.Tensor, boxes: list[torch.Tensor], image_size: tuple[int, int]
    ) -> torch.Tensor:
        """[sum k, D] normalised features of given boxes (in the transformed image's pixels)."""
        if sum(len(b) for b in boxes) == 0:
            return feature_map.new_zeros((0, self.feat_dim), dtype=torch.float32)
        return self.embed(self._fc7(feature_map, boxes, image_size))

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        images: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        if self.training and targets is None:
            raise ValueError("JointNet in train mode needs targets (boxes and labels)")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets = self.transform(images, targets)
        feature_map = self.backbone(image_list.tensors)
        # Anchors take the feature map's dtype (torchvision's AnchorGenerator): handed a bf16
        # map under autocast they would be rounded to 4 px steps past 512 px. A float32 view
        # keeps anchors, proposals and box targets exact; the RPN's conv still runs in bf16.
        proposals, rpn_losses = self.rpn(image_list, {"0": feature_map.float()}, targets)
        padded = tuple(image_list.tensors.shape[-2:])
        if self.training:
            losses = self._roi_losses(feature_map, proposals, targets, padded)
            losses["loss_rpn_cls"] = rpn_losses["loss_objectness"]
            losses["loss_rpn_box"] = rpn_losses["loss_rpn_box_reg"]
            return losses
        detections = self._detect(feature_map, proposals, image_list.image_sizes, padded)
        detections = self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        if self._test_views() != [(1.0, False)]:
            boxes = [d["boxes"] for d in detections]
            base = torch.cat([d["features"] for d in detections])  # view (1.0, not mirrored)
            features = self._mean_view_features(images, boxes, base)
            for detection, feature in zip(detections, features, strict=True):
                detection["features"] = feature
        return detections

    @torch.no_grad()
    def query_features(
        self, images: list[torch.Tensor], boxes: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Features of the given boxes (pixels of each input image) in place of proposals."""
        boxes = [b.to(images[i].device, torch.float32) for i, b in enumerate(boxes)]
        return self._mean_view_features(images, boxes)

    def _mean_view_features(
        self,
        images: list[torch.Tensor],
        boxes: list[torch.Tensor],
        base: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Per image, the [k, D] normalised mean of the boxes' features over the test views;
        `base`, when given, holds the unscaled, unmirrored view's (detection computed it)."""
        total = None
        for scale, flip in self._test_views():
            if base is not None and (scale, flip) == (1.0, False):
                features = base
            else:
                features = self._view_features(images, boxes, scale, flip)
            total = features if total is None else total + features.to(total.dtype)
        return list(F.normalize(total, dim=1).split([len(b) for b in boxes]))

    def _view_features(
        self, images: list[torch.Tensor], boxes: list[torch.Tensor], scale: float, flip: bool
    ) -> torch.Tensor:
        """[sum k, D] features of boxes (input pixels) with the images resized to `scale` x
        min_size (and max_size) and, if `flip`, mirrored."""
        if flip:
            images = [image.flip(-1) for image in images]
            boxes = [
                hflip_boxes(b, image.shape[-1]) for b, image in zip(boxes, images, strict=True)
            ]
        transform = self.transform
        if scale != 1.0:
            # A transform of its own, not the shared one's min_size changed: a served model
            # may run several requests at once.
            transform = GeneralizedRCNNTransform(
                round(self.min_size * scale),
                round(self.max_size * scale),
                IMAGE_MEAN,
                IMAGE_STD,
                size_divisible=32,
            ).eval()
        image_list, targets = transform(images, [{"boxes": b} for b in boxes])
        feature_map = self.backbone(image_list.tensors)
        resized = [t["boxes"] for t in targets]
        return self.box_features(feature_map, resized, tuple(image_list.tensors.shape[-2:]))

    # ------------------------------------------------------------------ training

    def _sample_rois(
        self, proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampled RoIs per image, and their person/background, identity and box targets, and
        the box each is distilled towards (an index into all images' boxes; -1 for background
        and for RoIs below `distill_iou`)."""
        background = self.num_classes
        rois, det_labels, reid_labels, box_targets, box_index = [], [], [], [], []
        boxes_before = 0  # boxes of the images before this one
        for props, target in zip(proposals, targets, strict=True):
            gt_boxes = target["boxes"]
            gt_labels = target["labels"].to(torch.int64)
            props = torch.cat([props, gt_boxes.to(props.dtype)])  # gt boxes are RoIs too
            if len(gt_boxes):
                iou = box_ops.box_iou(gt_boxes, props)
                matched, best_iou = self.matcher(iou), iou.max(0).values
            else:
                matched = torch.full((len(props),), -1, dtype=torch.int64, device=props.device)
                best_iou = torch.zeros(len(props), device=props.device)
            foreground = matched >= 0
            positive, negative = self.sampler([foreground.to(torch.int64)])
            keep = torch.where(positive[0] | negative[0])[0]
            props, matched, foreground = props[keep], matched[keep].clamp(min=0), foreground[keep]
            distilled = foreground & (best_iou[keep] >= self.distill_iou)
            rois.append(props)
            det_labels.append(foreground.to(torch.int64))
            if len(gt_boxes):
                reid = torch.where(foreground, gt_labels[matched], background)
                box_targets.append(self.box_coder.encode_single(gt_boxes[matched], props))
            else:
                reid = torch.full_like(matched, background)
                box_targets.append(torch.zeros_like(props))
            reid_labels.append(reid)
            box_index.append(torch.where(distilled, matched + boxes_before, -1))
            boxes_before += len(gt_boxes)
        return (
            rois,
            torch.cat(det_labels),
            torch.cat(reid_labels),
            torch.cat(box_targets),
            torch.cat(box_index),
        )

    def _roi_losses(
        self,
        feature_map: torch.Tensor,
        proposals: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        image_size: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        rois, det_labels, reid_labels, box_targets, box_index = self._sample_rois(
            proposals, targets
        )
        fc7 = self._fc7(feature_map, rois, image_size)
        det_logits = self.det_score(fc7).float()
        deltas = self.box_regressor(fc7).float()
        loss_det = F.cross_entropy(det_logits, det_labels)
        positive = det_labels > 0
        loss_box = F.smooth_l1_loss(
            deltas[positive], box_targets[positive], beta=1 / 9, reduction="sum"
        ) / max(1, det_labels.numel())
        features = self.embed(fc7)
        loss_reid, acc_reid = self.reid_loss(features, reid_labels)
        acc_det = (det_logits.argmax(1) == det_labels).float().mean()
        losses = {
            "loss_det": loss_det,
            "loss_box": loss_box,
            "loss_reid": loss_reid,
            "acc_det": acc_det.detach(),
            "acc_reid": acc_reid.detach(),
        }
        if self.distill_weight > 0 and targets and "teacher" in targets[0]:
            teacher = torch.cat([t["teacher"] for t in targets])
            losses["loss_distill"] = self.distill_weight * _cosine_distance(
                features[box_index >= 0], teacher[box_index[box_index >= 0]]
            )
        return losses

    # ------------------------------------------------------------------ inference

    def _detect(
        self,
        feature_map: torch.Tensor,
        proposals: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
        padded: tuple[int, int],
    ) -> list[dict[str, torch.Tensor]]:
        fc7 = self._fc7(feature_map, proposals, padded)
        scores = F.softmax(self.det_score(fc7).float(), dim=1)[:, 1]
        boxes = self.box_coder.decode(self.box_regressor(fc7).float(), proposals).reshape(-1, 4)
        final_boxes = []
        for props_boxes, props_scores, size in zip(
            boxes.split([len(p) for p in proposals]),
            scores.split([len(p) for p in proposals]),
            image_sizes,
            strict=True,
        ):
            b = box_ops.clip_boxes_to_image(props_boxes, size)
            keep = torch.where(props_scores >= self.box_score_thresh)[0]
            keep = keep[box_ops.remove_small_boxes(b[keep], min_size=1e-2)]
            b, s = b[keep], props_scores[keep]
            keep = box_ops.nms(b, s, self.box_nms_thresh)[: self.detections_per_img]
            final_boxes.append((b[keep], s[keep]))
        # Features are pooled on the final (regressed) boxes, as for query boxes, so gallery
        # and query features come from the same computation.
        features = self.box_features(feature_map, [b for b, _ in final_boxes], padded)
        features = features.split([len(b) for b, _ in final_boxes])
        return [
            {"boxes": b, "scores": s, "features": f}
            for (b, s), f in zip(final_boxes, features, strict=True)
        ]


def _cosine_distance(features: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean 1 - cosine of unit-norm rows; 0 (still in the graph) when there are none."""
    if len(features) == 0:
        return features.sum() * 0.0
    return (1.0 - (features * teacher.to(features.dtype)).sum(1)).mean()


# The keyword arguments only the joint net has (IDNet has no detector), in the params' order.
DETECTOR_SETTINGS = _keyword_only(JointNet.__init__)


def build_joint_net(num_classes: int, **settings: Any) -> JointNet:
    """A JointNet for ``num_classes`` labelled identities (ids 0..C-1, background C).

    ``settings`` are JointNet's keyword arguments, e.g. ``**dataclasses.asdict(params.model)``
    and ``loss=dataclasses.asdict(params.train.loss)``.
    """
    return JointNet(num_classes, **settings)
