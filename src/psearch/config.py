"""params.yaml as typed, validated sections.

One dataclass per section. `load_params` reads the file (or the built-in
defaults), applies `--set SECTION.KEY=VALUE` overrides and validates every key
and type before any work starts; problems are one-line `PsearchError`s naming
the key. Only the standard library and PyYAML are imported here, so commands
that do not need torch stay fast to start.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from psearch.errors import PsearchError


@dataclass
class DataConfig:
    """The synthetic dataset written by `psearch synth` (the `synth` DVC stage)."""

    preset: Literal["tiny", "demo", "full", "paper-scale", "paper-demo", "many-ids"] = "demo"
    seed: int = 0


@dataclass
class IngestConfig:
    format: Literal["cuhk-sysu", "prw", "table"] = "cuhk-sysu"
    # format table only (docs/own-data.md): the CSV / Parquet of boxes, an optional table of
    # queries (None = one drawn per test identity per camera), how boxes are written, the
    # gallery sizes besides the whole test set, and the seed of the drawn queries / galleries.
    annotations: str | None = None
    queries: str | None = None
    box_format: Literal["xyxy", "xywh"] = "xyxy"
    gallery_sizes: list[int] = field(default_factory=lambda: [50, 100])
    seed: int = 0


@dataclass
class ModelConfig:
    """Architecture shared by pretrain, train and extract."""

    # small: a CPU-friendly trunk for the demo; vgg16: the paper; resnet50: the modern option.
    backbone: Literal["small", "vgg16", "resnet50"] = "small"
    # None = random init; a local file path; or a torchvision weights name (downloads).
    backbone_weights: str | None = None
    feat_dim: int = 256
    # roi_pool: the paper (configs/ set it); roi_align: the demo default (docs/demo-quality.md).
    roi_op: Literal["roi_pool", "roi_align"] = "roi_align"
    roi_size: int = 7
    # Width of fc6/fc7 for the small backbone (vgg16 uses 4096, resnet50 its res5 head).
    head_dim: int = 256
    # Leading trunk blocks that get no gradient (vgg16: conv1..conv5; resnet50: conv1, res2,
    # res3, res4); -1 = the backbone's default: conv1-conv2 (vgg16) / conv1+res2 (resnet50)
    # with pretrained weights, none with random init.
    freeze_blocks: int = -1
    # Batch norm of the trunk and head: train (plain), frozen (statistics and affine fixed),
    # frozen_stats (statistics fixed, affine trained: the authors' OIM ResNet-50); auto =
    # frozen with pretrained weights, train with random init. vgg16 has none.
    batch_norm: Literal["auto", "train", "frozen", "frozen_stats"] = "auto"
    # 9 anchors per location: 3 sizes x 3 aspect ratios (height / width), as the paper.
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128])
    anchor_ratios: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0])
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 300
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 100
    rpn_nms_thresh: float = 0.7
    rpn_batch_size_per_image: int = 256
    roi_batch_size_per_image: int = 128
    # Foreground share of those RoIs (py-faster-rcnn: 0.25; person search codebases use 0.5,
    # since every foreground RoI also trains the identity loss).
    roi_positive_fraction: float = 0.5
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.4
    detections_per_img: int = 100
    # Images are resized so the shorter side is min_size (longer side capped at max_size).
    min_size: int = 288
    max_size: int = 480
    # Test-time views: a box's feature is the normalised mean of its features with the image
    # resized to each of these x min_size (and max_size), and also mirrored when test_flip.
    # [] = min_size alone. Detection runs once, at min_size.
    test_scale_factors: list[float] = field(default_factory=lambda: [0.89, 1.0, 1.11])
    test_flip: bool = True


@dataclass
class LossConfig:
    # rss: random sampling softmax (the paper); softmax: the ablation baseline; oim: follow-up;
    # none: no identity loss, the detector alone (the paper's separately trained "Deep").
    reid_loss: Literal["rss", "softmax", "oim", "none"] = "rss"
    rss_k: int = 100
    # rss/softmax: the L2-normalised fc8 feature is multiplied by this before the identity
    # classifier. Unit-norm inputs bound the logits by the weights' norms, so with s = 1 the
    # softmax stays nearly uniform and learns slowly (NormFace, Wang et al. 2017).
    softmax_scale: float = 30.0
    oim_momentum: float = 0.5
    oim_scalar: float = 30.0
    oim_queue_size: int = 500


@dataclass(kw_only=True)
class TrainLoopConfig:
    """The settings of psearch.train.engine's loop, shared by `pretrain` and `train`.

    Each section sets its own schedule (batch_size, epochs, lr, lr_steps, warmup_iters,
    checkpoint_every); the rest has one default for both. A schedule is `epochs` passes over
    the data (the demo) or, when `max_iters` > 0, that many iterations whatever the dataset
    size (the papers' recipes state theirs so).
    """

    batch_size: int
    epochs: int
    max_iters: int = 0  # > 0: the schedule's length in iterations, in place of `epochs`
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_steps: list[int]  # iterations from which lr is multiplied by 0.1 (each one again)
    warmup_iters: int
    grad_clip: float = 10.0
    amp: Literal["off", "bf16", "fp16"] = "bf16"  # CUDA only; CPU always trains in float32
    hflip: float = 0.5
    checkpoint_every: int  # iterations; 0 = no checkpoints (no --resume)
    log_every: int = 10  # iterations between MLflow metric points
    max_steps: int = 0  # stop after this many iterations; 0 = run every epoch
    num_workers: int = 2
    seed: int = 0
    device: str = "auto"


@dataclass(kw_only=True)
class PretrainConfig(TrainLoopConfig):
    """IDNet: classify cropped ground-truth and background boxes into C + 1 classes."""

    crop_height: int = 96  # the person box inside each crop is resized to this
    crop_width: int = 48
    # Each crop spans this many times the box around it (>= 1), as the joint net's RoIs see
    # their surroundings; IDNet pools only the box (psearch.imaging).
    crop_context: float = 1.5
    background_ratio: float = 1.0
    # Probability that a crop gets one random rectangle (2-40 % of it) filled with the image
    # mean: random erasing (Zhong et al. 2020), occlusions IDNet has not seen. 0 = none.
    erase: float = 0.0
    # The paper: 256 crops of 224 x 224. 64 gives the demo's ~1000 crops 15 steps an epoch.
    batch_size: int = 64
    epochs: int = 16
    lr: float = 0.01
    lr_steps: list[int] = field(default_factory=list)
    warmup_iters: int = 20
    checkpoint_every: int = 100
    # False: the recipe has no IDNet stage (OIM trains from ImageNet weights); `psearch
    # pretrain` then writes a marker instead of a model and `psearch train` starts without one.
    enabled: bool = True
    # IDNet's identity loss; None = train.loss (the paper pretrains with the full softmax).
    loss: LossConfig | None = None


@dataclass(kw_only=True)
class TrainConfig(TrainLoopConfig):
    """Joint detection + re-identification training."""

    batch_size: int = 2
    epochs: int = 10
    # The paper: 1e-3 (VGG16 from ImageNet), x0.1 after 100k of 120k iterations. The demo:
    # 10 epochs of 160 iterations, x0.1 for the last quarter.
    lr: float = 3e-3
    lr_steps: list[int] = field(default_factory=lambda: [1200])
    warmup_iters: int = 50
    checkpoint_every: int = 200
    # Multi-scale training: each training image's shorter side is model.min_size times one of
    # these, drawn per image; tests stay at model.min_size. [] = model.min_size only (the
    # paper). The demo's five scales (225 to 351 px) raised gallery_100 mAP 0.285 -> 0.325.
    scale_factors: list[float] = field(default_factory=lambda: [0.78, 0.89, 1.0, 1.11, 1.22])
    # > 0: a loss of this weight pulls the features of RoIs on a person towards IDNet's feature
    # of that person's crop (1 - cosine), so joint training keeps what IDNet learnt; needs
    # an IDNet (--init). 0 = the paper's four losses. The demo's 3 raised gallery_100 mAP
    # 0.325 -> 0.389 (docs/demo-quality.md).
    distill_weight: float = 3.0
    # Distil only the RoIs that overlap their person's box by at least this IoU (0.5 = every
    # foreground RoI). The demo's 0.7 scored 0.472 against 0.459 (0.5) and 0.429 (0.9).
    distill_iou: float = 0.7
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class ExtractConfig:
    batch_size: int = 4
    num_workers: int = 2
    device: str = "auto"
    amp: bool = True


@dataclass
class EvaluateConfig:
    det_thresh: float = 0.5
    det_eval_thresh: float = 0.01
    # None = every gallery size present in the manifests.
    gallery_sizes: list[int] | None = None
    # PRW convention: only frames from other cameras are in the gallery.
    cross_camera: bool = False
    worst_queries: int = 20
    # Context bipartite graph matching (SeqNet's re-ranking, psearch.evaluation.cbgm).
    cbgm: bool = False
    # False: skip the PNGs (and the matplotlib import); the CSVs are always written.
    plots: bool = True


@dataclass
class IndexConfig:
    """The gallery's nearest-neighbour index (`psearch index`, read by search and serve)."""

    # flat: exact inner product (IndexFlatIP); ivf: inverted lists (IVF-Flat, or IVF-PQ when
    # pq_m > 0); hnsw: a navigable small-world graph. Approximate kinds pay off past ~10^5.
    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    # Detections below this score are left out; None = evaluate.det_thresh.
    det_thresh: float | None = None
    nlist: int = 0  # ivf: inverted lists; 0 = 4 * sqrt(detections)
    nprobe: int = 16  # ivf: lists visited per query
    pq_m: int = 0  # ivf: product-quantizer sub-vectors (8 bits each); 0 = IVF-Flat
    hnsw_m: int = 32  # hnsw: neighbours per node
    ef_construction: int = 200  # hnsw: search width while building
    ef_search: int = 128  # hnsw: search width per query


@dataclass
class RegisterConfig:
    model_name: str = "person-search"
    metric: str = "search.gallery_100.mAP"
    alias: str = "champion"


@dataclass
class TrackingConfig:
    # None = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
    tracking_uri: str | None = None
    experiment: str = "person-search"
    enabled: bool = True


@dataclass
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # The Kubeflow pipeline's settings (images, resources); free-form, checked by psearch.pipeline.
    pipeline: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# YAML 1.1 (PyYAML) reads `1e-4` as a string: it wants a dot (`1.0e-4`). YAML 1.2, DVC's
# `-S train.lr=1e-4` and every user expect a number, so float fields accept that spelling.
_FLOAT_WITHOUT_DOT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


def _yaml12_float(value: str) -> float | str:
    return float(value) if _FLOAT_WITHOUT_DOT.fullmatch(value.strip()) else value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` checked (and mildly coerced: int -> float) against type hint `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except PsearchError as exc:
                errors.append(str(exc))
        raise PsearchError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise PsearchError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise PsearchError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise PsearchError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise PsearchError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PsearchError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            value = _yaml12_float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PsearchError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise PsearchError(f"{key}: expected a string, got {value!r}")
        return value
    raise PsearchError(f"{key}: unsupported type {_type_name(tp)}")


def build_section(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping (None = every default), rejecting unknown keys and
    wrong types; `prefix` is the section's dotted name in error messages (e.g. "train.loss")."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PsearchError(f"{prefix or 'params'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise PsearchError(f"unknown parameter {where} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name in known:
        if name in data:
            where = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(data[name], hints[name], where)
    return cls(**kwargs)


def to_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)


def flatten(params: Any, prefix: str = "") -> dict[str, Any]:
    """{'train.lr': 0.001, ...} for logging as MLflow params."""
    tree = to_dict(params) if dataclasses.is_dataclass(params) else params
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise PsearchError(f"--set {assignment!r}: expected SECTION.KEY=VALUE")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise PsearchError(f"--set {assignment!r}: expected SECTION.KEY=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise PsearchError(f"--set {assignment!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


DEFAULT_PARAMS_FILE = "params.yaml"


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last silently: a pasted second `train:` section would replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} appears twice (line {line})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_params_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PsearchError(f"{path}: params file not found")
    try:
        tree = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.constructor.ConstructorError as exc:
        raise PsearchError(f"{path}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise PsearchError(f"{path}: not valid YAML{where}") from None
    if not isinstance(tree, dict):
        raise PsearchError(f"{path}: expected a mapping of sections at the top level")
    return tree


def _migrate_renamed_keys(tree: dict[str, Any], source: str) -> None:
    """Read keys older params files spell differently, with a warning: `lr_step: N` (one drop,
    0 = none) became `lr_steps: [N]` when schedules took several drops."""
    for section in ("pretrain", "train"):
        values = tree.get(section)
        if isinstance(values, dict) and "lr_step" in values and "lr_steps" not in values:
            step = values.pop("lr_step")
            # 0 meant "never"; a value that is no integer is passed on for validation to name.
            values["lr_steps"] = ([step] if step > 0 else []) if isinstance(step, int) else step
            warnings.warn(
                f"{source}: {section}.lr_step is now {section}.lr_steps (a list); read as "
                f"lr_steps: {values['lr_steps']}",
                stacklevel=3,
            )


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Params:
    """params.yaml (or `path`, or built-in defaults when neither exists) plus overrides.

    A file may leave out sections or keys: those keep their built-in defaults (a small file
    for one command, `register:` alone say, is a complete params file). Each value given must
    have its key's type and lie in its range (`check_ranges`).
    """
    if path is None and Path(DEFAULT_PARAMS_FILE).is_file():
        path = DEFAULT_PARAMS_FILE
    tree = read_params_file(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    _migrate_renamed_keys(tree, source)
    for assignment in overrides or []:
        _apply_override(tree, assignment)
    try:
        params = build_section(Params, tree)
        check_ranges(params)
    except PsearchError as exc:
        raise PsearchError(f"{source}: {exc}") from None
    return params


# Values that only make sense above zero (a size, a count of steps, a learning rate) or at or
# above it (a count that may be off, a rate that may be zero). Checked here, before any work:
# a zero batch size or a negative lr would otherwise fail mid-run or train nothing.
_LOOPS = ("pretrain", "train")
_POSITIVE = (
    *(f"{loop}.{key}" for loop in _LOOPS for key in ("batch_size", "epochs", "lr")),
    "pretrain.crop_height",
    "pretrain.crop_width",
    "model.min_size",
    "model.max_size",
    "model.feat_dim",
    "model.head_dim",
    "model.roi_size",
    "extract.batch_size",
)
_NOT_NEGATIVE = (
    *(
        f"{loop}.{key}"
        for loop in _LOOPS
        for key in (
            "max_iters",
            "warmup_iters",
            "checkpoint_every",
            "max_steps",
            "num_workers",
            "momentum",
            "weight_decay",
            "grad_clip",
        )
    ),
    "pretrain.background_ratio",
    "train.distill_weight",
    "extract.num_workers",
)
_ENTRIES_NOT_NEGATIVE = tuple(f"{loop}.lr_steps" for loop in _LOOPS)
# Probabilities and IoUs: from 0 to 1.
_UNIT_INTERVAL = (*(f"{loop}.hflip" for loop in _LOOPS), "pretrain.erase", "train.distill_iou")
_ENTRIES_POSITIVE = (
    "model.anchor_sizes",
    "model.anchor_ratios",
    "model.test_scale_factors",
    "train.scale_factors",
)


def _value(params: Params, key: str) -> Any:
    value: Any = params
    for part in key.split("."):
        value = getattr(value, part)
    return value


def check_ranges(params: Params) -> None:
    """PsearchError naming the first key whose value is out of its range."""
    for key in _POSITIVE:
        if not _value(params, key) > 0:  # `not >` also refuses NaN
            raise PsearchError(f"{key}: must be greater than 0, got {_value(params, key)}")
    for key in _NOT_NEGATIVE:
        if not _value(params, key) >= 0:
            raise PsearchError(f"{key}: must not be negative, got {_value(params, key)}")
    for key in _UNIT_INTERVAL:
        if not 0 <= _value(params, key) <= 1:
            raise PsearchError(f"{key}: must be from 0 to 1, got {_value(params, key)}")
    for keys, bound, test in (
        (_ENTRIES_NOT_NEGATIVE, "not be negative", lambda v: v >= 0),
        (_ENTRIES_POSITIVE, "be greater than 0", lambda v: v > 0),
    ):
        for key in keys:
            bad = [v for v in _value(params, key) if not test(v)]
            if bad:
                raise PsearchError(f"{key}: every entry must {bound}, got {bad[0]}")
