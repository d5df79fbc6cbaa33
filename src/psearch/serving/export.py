"""`psearch export`: a joint model as one portable graph (ONNX or TorchScript), and its runner.

The graph takes one image and any number of query boxes and gives what `psearch extract` takes
from the network, with the same test-time settings (resize, proposals, score threshold, NMS,
the views a feature averages over)::

    image        float32 [3, H, W], RGB in 0..1, any H and W
    query_boxes  float32 [K, 4], x1 y1 x2 y2 in image pixels (K may be 0)
    -> boxes [N, 4] (image pixels), scores [N], features [N, D], query_features [K, D]

Each file carries what it was made from (the source weights' fingerprint, the feature size)
as metadata: ONNX metadata_props["psearch"], TorchScript extra file "psearch.json". A server
on the exported file can then tell whether an index was built by the same weights.

Both formats are traced with torch.onnx's TorchScript-based exporter (`dynamo=False`,
opset 17) / `torch.jit.trace`: torch.export (the dynamo exporter) stops at torchvision's
batched NMS, whose output size depends on the data. ONNX needs only onnxruntime to run;
TorchScript needs torch and torchvision (for the roi_pool / nms operators), not psearch.
"""

from __future__ import annotations

import contextlib
import json
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.ops.boxes as tv_boxes
from torch import nn
from torch.onnx import operators
from torchvision.models.detection.image_list import ImageList

from psearch import __version__
from psearch.atomic import atomic_file
from psearch.errors import PsearchError
from psearch.imaging import hflip_boxes
from psearch.inference.index import weights_fingerprint
from psearch.tracking import tracking_uri

FORMATS = ("onnx", "torchscript")
INPUT_NAMES = ("image", "query_boxes")
OUTPUT_NAMES = ("boxes", "scores", "features", "query_features")
OPSET = 17
META_KEY = "psearch"  # ONNX metadata_props key; TorchScript extra file META_KEY + ".json"
# The trace's example: an image of two different sides and two query boxes.
EXAMPLE_SIZE = (120, 160)


def _setting(net: nn.Module, name: str):
    """A test-time setting of the net: its own attribute, else its config's."""
    return getattr(net, name) if hasattr(net, name) else getattr(net.cfg, name)


class SearchGraph(nn.Module):
    """JointNet's test-time forward for one image plus given query boxes, written so a trace
    keeps every image size a tensor (the exported graph then takes any size)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval()

    def forward(
        self, image: torch.Tensor, query_boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        net = self.net
        in_hw = operators.shape_as_tensor(image)[-2:]
        batched, ratio, out_hw = self._network_input(image, in_hw, 1.0)
        size = (out_hw[0], out_hw[1])
        feature_map = net.backbone(batched)
        proposals, _ = net.rpn(ImageList(batched, [size]), {"0": feature_map})
        padded = batched.shape[-2:]
        fc7 = net._fc7(feature_map, proposals, padded)
        scores = F.softmax(net.det_score(fc7).float(), dim=1)[:, 1]
        boxes = net.box_coder.decode(net.box_regressor(fc7).float(), proposals).reshape(-1, 4)
        # As JointNet._detect: clip, score threshold, drop tiny boxes, NMS, keep the best.
        boxes = traced_clip(boxes, size)
        keep = torch.where(scores >= _setting(net, "box_score_thresh"))[0]
        keep = keep[tv_boxes.remove_small_boxes(boxes[keep], min_size=1e-2)]
        boxes, scores = boxes[keep], scores[keep]
        keep = tv_boxes.nms(boxes, scores, _setting(net, "box_nms_thresh"))
        keep = keep[: _setting(net, "detections_per_img")]
        net_boxes, scores = boxes[keep], scores[keep]  # in the network input's pixels
        boxes = net_boxes / ratio
        # As JointNet: each feature is the normalised mean over the test views (scales x
        # mirror); the unscaled, unmirrored view reuses the detection's feature map.
        features, query_features = 0.0, 0.0
        for scale, flip in net._test_views():
            if (scale, flip) == (1.0, False):
                view_map, view_padded = feature_map, padded
                view_boxes, view_queries = net_boxes, query_boxes * ratio
            else:
                view_input, view_ratio, _ = self._network_input(
                    image.flip(-1) if flip else image, in_hw, scale
                )
                view_map, view_padded = net.backbone(view_input), view_input.shape[-2:]
                view_boxes, view_queries = boxes, query_boxes
                if flip:
                    view_boxes = hflip_boxes(view_boxes, in_hw[1])
                    view_queries = hflip_boxes(view_queries, in_hw[1])
                view_boxes, view_queries = view_boxes * view_ratio, view_queries * view_ratio
            features = features + net.embed(net._fc7(view_map, [view_boxes], view_padded))
            query_features = query_features + net.embed(
                net._fc7(view_map, [view_queries], view_padded)
            )
        return boxes, scores, F.normalize(features, dim=1), F.normalize(query_features, dim=1)

    def _network_input(self, image: torch.Tensor, in_hw: torch.Tensor, scale: float):
        """(the network's padded input, the x, y, x, y scale from image pixels to it, and the
        resized size) for the image resized to `scale` x (min_size, max_size)."""
        transform = self.net.transform
        min_size, max_size = transform.min_size[-1], transform.max_size
        if scale != 1.0:  # as JointNet._view_features
            min_size, max_size = round(min_size * scale), round(max_size * scale)
        out_hw = _resized_size(in_hw, min_size, max_size)
        resized = bilinear_resize(transform.normalize(image), in_hw, out_hw)
        ratio = (out_hw.float() / in_hw.float()).flip(0).repeat(2)
        batched = transform.batch_images([resized], size_divisible=transform.size_divisible)
        return batched, ratio, out_hw


def _resized_size(in_hw: torch.Tensor, min_size: int, max_size: int) -> torch.Tensor:
    """GeneralizedRCNNTransform's output size, floor(side * scale), computed in float64 as
    torch computes it, so the exported graph picks the same size for every image."""
    sides = in_hw.to(torch.float64)
    # One-element float64 tensors throughout: the exporter computes with 0-d tensors and
    # Python numbers in float32, where 96 / 150 * 200 floors to 127 instead of 128.
    low, high = (torch.tensor([float(v)], dtype=torch.float64) for v in (min_size, max_size))
    scale = torch.minimum(low / sides.amin(0, keepdim=True), high / sides.amax(0, keepdim=True))
    return torch.floor(sides * scale).to(torch.int64)


def _source_index(in_size: torch.Tensor, out_size: torch.Tensor):
    """Per output pixel: the two source pixels and their weights, as torch's CPU bilinear
    kernel computes them (scale = in / out in float32, half-pixel centres, clamped at 0)."""
    scale = in_size.to(torch.float32) / out_size.to(torch.float32)
    real = ((torch.arange(out_size).to(torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    low = real.to(torch.int64)
    high = torch.minimum(low + 1, in_size - 1)
    weight = (real - low.to(torch.float32)).clamp(0, 1)
    return low, high, 1 - weight, weight


def bilinear_resize(image: torch.Tensor, in_hw: torch.Tensor, out_hw: torch.Tensor):
    """F.interpolate(bilinear, align_corners=False) written out with gathers: onnxruntime's
    Resize maps pixels through a float32 scale factor (1 / 0.53333336 is not 1.875), which
    moves samples by up to 3e-5 px, enough to shift a random net's boxes by 0.03 px."""
    y0, y1, wy0, wy1 = _source_index(in_hw[0], out_hw[0])
    x0, x1, wx0, wx1 = _source_index(in_hw[1], out_hw[1])
    top, bottom = image[:, y0], image[:, y1]
    wx0, wx1 = wx0[None, None], wx1[None, None]
    rows_top = top[:, :, x0] * wx0 + top[:, :, x1] * wx1
    rows_bottom = bottom[:, :, x0] * wx0 + bottom[:, :, x1] * wx1
    return rows_top * wy0[None, :, None] + rows_bottom * wy1[None, :, None]


def traced_clip(boxes: torch.Tensor, size) -> torch.Tensor:
    """clip_boxes_to_image with the size kept as tensors (torchvision's tracing branch turns
    it into constants through torch.tensor(width), fixing the image size in the graph)."""
    height, width = (torch.as_tensor(v).to(boxes.dtype) for v in size)
    x = torch.minimum(boxes[..., 0::2].clamp(min=0), width)
    y = torch.minimum(boxes[..., 1::2].clamp(min=0), height)
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


@contextlib.contextmanager
def _tensor_sized_clipping():
    """While tracing, torchvision's RPN clips proposals with traced_clip."""
    original = tv_boxes.clip_boxes_to_image
    tv_boxes.clip_boxes_to_image = traced_clip
    try:
        yield
    finally:
        tv_boxes.clip_boxes_to_image = original


def _example() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, *EXAMPLE_SIZE, generator=generator)
    boxes = torch.tensor([[10.0, 20.0, 40.0, 100.0], [80.0, 10.0, 120.0, 110.0]])
    return image, boxes


def export_net(net: nn.Module, fmt: str, out: Path) -> dict[str, Any]:
    """Trace `net` (a JointNet on the CPU) to `out` in format `fmt`, atomically."""
    if fmt not in FORMATS:
        raise PsearchError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    # eval() on the wrapper too: the exporter restores the wrapper's mode (and so the net's).
    graph = SearchGraph(net.cpu()).eval()
    example = _example()
    meta = {
        "fingerprint": weights_fingerprint(net),
        "feat_dim": int(net.feat_dim),
        "psearch": __version__,
    }
    started = time.perf_counter()
    with atomic_file(out) as tmp, _tensor_sized_clipping(), torch.no_grad():
        if fmt == "onnx":
            axes = {"image": {1: "height", 2: "width"}, "query_boxes": {0: "queries"}}
            axes.update({name: {0: "detections"} for name in OUTPUT_NAMES[:3]})
            axes["query_features"] = {0: "queries"}
            torch.onnx.export(
                graph,
                example,
                str(tmp),
                dynamo=False,
                opset_version=OPSET,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=axes,
            )
            _add_onnx_metadata(tmp, meta)
        else:
            traced = torch.jit.trace(graph, example, check_trace=False)
            torch.jit.save(traced, str(tmp), _extra_files={f"{META_KEY}.json": json.dumps(meta)})
    return {
        "format": fmt,
        "out": str(out),
        "bytes": Path(out).stat().st_size,
        "seconds": round(time.perf_counter() - started, 3),
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
        "opset": OPSET if fmt == "onnx" else None,
        **meta,
    }


def _add_onnx_metadata(path: Path, meta: dict[str, Any]) -> None:
    import onnx  # lazy: only writing an ONNX file needs the onnx package

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {META_KEY: json.dumps(meta)})
    onnx.save(model, str(path))


def exported_format(path: str | Path) -> str | None:
    """'onnx' (by the .onnx suffix), 'torchscript' (a TorchScript archive: a zip with
    constants.pkl and code/), or None (anything else, e.g. a psearch state-dict file)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as exc:
        raise PsearchError(f"{path}: a damaged model file ({exc})") from None
    has_code = any("/code/" in name for name in names)
    return "torchscript" if has_code and any(n.endswith("/constants.pkl") for n in names) else None


class ExportedModel:
    """Run an exported file: `model(image [3,H,W] float32 0..1, boxes [K,4])` -> four arrays.

    `runtime` says what runs it ('onnxruntime' on the CPU, or 'torchscript'); `meta` is what
    the export recorded (fingerprint, feat_dim; empty for a file from before it did)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise PsearchError(f"{path}: exported model not found")
        self.path = path
        self.format = "onnx" if path.suffix.lower() == ".onnx" else "torchscript"
        try:
            self.meta = self._open_onnx(threads) if self.format == "onnx" else self._open_script()
        except Exception as exc:  # noqa: BLE001
            # onnxruntime and torch.jit raise their own types, with pages of context.
            first = next(iter(str(exc).strip().splitlines()), "") or type(exc).__name__
            raise PsearchError(f"{path}: not a readable {self.format} model ({first})") from None
        self.runtime = "onnxruntime" if self.format == "onnx" else "torchscript"

    def _open_onnx(self, threads: int | None) -> dict[str, Any]:
        import onnxruntime  # lazy: only ONNX runs need it (about 0.3 s to import)

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # no warnings about unused initialisers
        if threads:
            options.intra_op_num_threads = threads
        self._session = onnxruntime.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )
        names = [i.name for i in self._session.get_inputs()]
        if names != list(INPUT_NAMES):
            raise ValueError(f"inputs {names}, expected {list(INPUT_NAMES)} (psearch export)")
        text = self._session.get_modelmeta().custom_metadata_map.get(META_KEY)
        return json.loads(text) if text else {}

    def _open_script(self) -> dict[str, Any]:
        extra = {f"{META_KEY}.json": ""}
        self._module = torch.jit.load(str(self.path), map_location="cpu", _extra_files=extra)
        self._module.eval()
        text = extra[f"{META_KEY}.json"]
        return json.loads(text) if text else {}

    def __call__(self, image: np.ndarray, query_boxes: np.ndarray | None = None):
        image = np.ascontiguousarray(image, dtype=np.float32)
        boxes = np.zeros((0, 4), np.float32) if query_boxes is None else query_boxes
        boxes = np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4)
        if self.format == "onnx":
            return tuple(self._session.run(None, {"image": image, "query_boxes": boxes}))
        with torch.no_grad():
            outputs = self._module(torch.from_numpy(image), torch.from_numpy(boxes))
        return tuple(o.numpy() for o in outputs)

    def query_features(self, image: np.ndarray, query_boxes: np.ndarray) -> np.ndarray:
        """[K, D] features of the boxes: the query path of a server. onnxruntime is asked
        for that output alone; TorchScript runs the whole graph."""
        if self.format != "onnx":
            return self(image, query_boxes)[3]
        image = np.ascontiguousarray(image, dtype=np.float32)
        boxes = np.ascontiguousarray(query_boxes, dtype=np.float32).reshape(-1, 4)
        feeds = {"image": image, "query_boxes": boxes}
        return self._session.run([OUTPUT_NAMES[3]], feeds)[0]


def export(model: str, fmt: str, out: Path, params) -> dict[str, Any]:
    """Export the joint model at `model` (a file, directory or MLflow URI) with the params'
    test-time settings; log the file to the model's MLflow run when the model came from one."""
    # lazy: the inference loader pulls in the model classes (torchvision detection)
    from psearch.inference.loading import load_joint

    if str(model).startswith(("runs:/", "models:/")):
        import mlflow  # lazy: only MLflow URIs need it (seconds to import)

        mlflow.set_tracking_uri(tracking_uri(params.tracking))
    net, _ = load_joint(str(model), params, torch.device("cpu"))
    info = export_net(net, fmt, Path(out))
    info["model"] = str(model)
    run_id = mlflow_run_of(model)
    if run_id is not None:
        log_export(run_id, Path(out), info, params)
        info["mlflow_run"] = run_id
    return info


def mlflow_run_of(uri: str) -> str | None:
    """The MLflow run a model URI belongs to (runs:/, models:/name/version, models:/name@alias,
    models:/<logged model id>); None for a local file."""
    if not uri.startswith(("runs:/", "models:/")):
        return None
    if uri.startswith("runs:/"):
        return uri[len("runs:/") :].split("/", 1)[0]
    import mlflow  # lazy: only MLflow URIs need it (seconds to import)
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    rest = uri[len("models:/") :].strip("/")
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return client.get_model_version_by_alias(name, alias).run_id
        if "/" in rest:
            name, version = rest.split("/", 1)
            return client.get_model_version(name, version).run_id
        return client.get_logged_model(rest).source_run_id
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PsearchError(f"{uri}: cannot find the model's MLflow run ({first})") from None


def log_export(run_id: str, path: Path, info: dict[str, Any], params) -> None:
    """The exported file and its description as artifacts of run `run_id`, under export/."""
    import mlflow  # lazy: only MLflow URIs need it

    client = mlflow.MlflowClient()
    client.log_artifact(run_id, str(path), artifact_path="export")
    client.log_text(run_id, json.dumps(info, indent=2), f"export/{path.name}.json")
