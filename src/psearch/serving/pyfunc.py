"""The MLflow ``pyfunc`` face of a psearch model file, and logging one to an MLflow run.

``log_model`` logs a model file to the active run as a ``pyfunc`` model wrapping the file
itself, so both ``psearch.inference.loading.fetch_model("runs:/<id>/model")`` and
``mlflow.pyfunc.load_model(...)`` work. The pyfunc is logged as MLflow 3 "models from code"
(MODEL_CODE, a file of this package), so the logged model holds no pickled Python object and
loading it unpickles nothing. It carries a signature (SIGNATURE: the table
below, in and out) and, given the manifests it was trained on, an input example: one of
their test images, whole and with one of its boxes (``example_input``) — MLflow runs the
logged model on it once, so a model that cannot answer its own example warns at logging.

``predict`` takes a DataFrame with a ``path`` column (image files) and optional query box
columns ``x1, y1, x2, y2`` (pixels). A row with a box gets that box's feature (the paper's
query phase); a row without one gets every detection in the image. The result has one row
per box: ``path, x1, y1, x2, y2, score, feature`` (``score`` is NaN for query rows, ``feature``
a list of D floats, L2-normalised). An IDNet checkpoint only answers rows with boxes.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from torchvision.io import ImageReadMode, decode_image

from psearch.config import PretrainConfig
from psearch.data.loaders import dataset_root
from psearch.data.manifest import read_manifests
from psearch.errors import PsearchError
from psearch.imaging import cut_crops
from psearch.models.idnet import IDNet, idnet_crop_size
from psearch.models.io import load_model

# The pyfunc's code file (see its docstring): MLflow runs it at load time instead of
# unpickling a PersonSearchModel.
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
BOX_COLUMNS = ["x1", "y1", "x2", "y2"]
OUTPUT_COLUMNS = ["path", *BOX_COLUMNS, "score", "feature"]
# IDNet crops when the checkpoint's meta does not say (older IDNet files).
DEFAULT_CROP_SIZE = (PretrainConfig.crop_height, PretrainConfig.crop_width)
# What predict takes and returns, for the model's page in the MLflow UI and for serving.
# The box columns are optional: a row without them asks for every detection.
SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec(DataType.string, "path"),
            *(ColSpec(DataType.double, c, required=False) for c in BOX_COLUMNS),
        ]
    ),
    outputs=Schema(
        [
            ColSpec(DataType.string, "path"),
            *(ColSpec(DataType.double, c) for c in BOX_COLUMNS),
            ColSpec(DataType.double, "score"),
            ColSpec(Array(DataType.double), "feature"),
        ]
    ),
)


def pip_requirements() -> list[str]:
    """The environment a logged model needs (psearch itself must be installed too)."""
    pins = []
    for name in ("psearch", "torch", "torchvision", "mlflow", "pandas"):
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def read_image(path: str) -> torch.Tensor:
    """[3, H, W] uint8 RGB."""
    try:
        return decode_image(path, mode=ImageReadMode.RGB)
    except (RuntimeError, OSError) as exc:
        raise PsearchError(f"{path}: cannot read image ({exc})") from None


class PersonSearchModel(mlflow.pyfunc.PythonModel):
    # predict's input is hinted as a DataFrame, a hint MLflow infers no signature from (other
    # hints would become one) and which spares every import of this module its warning asking
    # for type hints.
    def load_context(self, context):
        self.model, self.meta = load_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None):
        if "path" not in model_input.columns:
            raise PsearchError("pyfunc input: a 'path' column of image files is required")
        has_boxes = all(c in model_input.columns for c in BOX_COLUMNS)
        rows: list[dict[str, Any]] = []
        with torch.no_grad():
            for index, record in model_input.reset_index(drop=True).iterrows():
                box = [record[c] for c in BOX_COLUMNS] if has_boxes else None
                if box is not None and any(pd.isna(v) for v in box):
                    box = None
                rows.extend(self._predict_row(str(record["path"]), box, index))
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)

    def _predict_row(self, path: str, box: list[float] | None, index: int) -> list[dict]:
        pixels = read_image(path)
        image = pixels.float().div(255.0)  # what the joint net takes
        if box is not None:
            boxes = torch.tensor([box], dtype=torch.float32)
            if isinstance(self.model, IDNet):
                feature = self.model.features(self._crop(pixels, box))[0]
            else:
                feature = self.model.query_features([image], [boxes])[0][0]
            return [
                dict(zip(OUTPUT_COLUMNS, [path, *box, float("nan"), feature.tolist()], strict=True))
            ]
        if isinstance(self.model, IDNet):
            raise PsearchError(f"pyfunc input row {index}: an IDNet needs a query box (x1..y2)")
        detections = self.model([image])[0]
        return [
            dict(zip(OUTPUT_COLUMNS, [path, *b.tolist(), float(s), f.tolist()], strict=True))
            for b, s, f in zip(
                detections["boxes"], detections["scores"], detections["features"], strict=True
            )
        ]

    def _crop(self, pixels: torch.Tensor, box: list[float]) -> torch.Tensor:
        """[1, 3, h, w] of a uint8 image: cut as IDNet's training crops are (psearch.imaging)."""
        size = idnet_crop_size(self.meta, DEFAULT_CROP_SIZE)
        return cut_crops(pixels, [box], size, self.model.context)


def example_input(manifests: str | Path, whole_image: bool = True) -> pd.DataFrame | None:
    """predict's input for the first test image of `manifests` that has a box: the image
    whole (when `whole_image`; an IDNet only answers boxes) and that box. None when the
    manifests list no such image or its file is missing."""
    tables = read_manifests(manifests)
    images = tables.images.to_pydict()
    test = {
        i: p
        for i, p, s in zip(images["image_id"], images["path"], images["split"], strict=True)
        if s == "test"
    }
    boxes = tables.boxes.to_pydict()
    position = next((i for i, image in enumerate(boxes["image_id"]) if image in test), None)
    if position is None:
        return None
    image_id = boxes["image_id"][position]
    path = dataset_root(tables) / test[image_id]
    if not path.is_file():
        return None
    box = {c: float(boxes[c][position]) for c in BOX_COLUMNS}
    rows = [{"path": str(path), **box}]
    if whole_image:
        rows.insert(0, {"path": str(path), **dict.fromkeys(BOX_COLUMNS, float("nan"))})
    return pd.DataFrame(rows, columns=["path", *BOX_COLUMNS])


def log_model(
    model_file: str | Path, name: str = "model", example: pd.DataFrame | None = None
) -> tuple[str, str]:
    """Log a model file to the active MLflow run as a pyfunc model, with SIGNATURE and
    `example` (see example_input) as its input example.

    Returns ``(runs:/<run id>/<name>, models:/<logged model id>)``: the first is the URI
    users read in the run, the second MLflow 3's own id of the logged model, which the
    registry takes without falling back (and warning) from the run's artifact path.
    """
    model_file = Path(model_file)
    if not model_file.is_file():
        raise PsearchError(f"{model_file}: model file not found")
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_model needs an active MLflow run (mlflow.start_run)")
    logged = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={"checkpoint": str(model_file)},
        pip_requirements=pip_requirements(),
        signature=SIGNATURE,
        input_example=example,
    )
    return f"runs:/{run.info.run_id}/{name}", logged.model_uri
