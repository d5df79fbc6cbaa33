"""The MLflow ``pyfunc`` face of a psearch model file (what ``io.log_model`` logs).

``predict`` takes a DataFrame with a ``path`` column (image files) and optional query box
columns ``x1, y1, x2, y2`` (pixels). A row with a box gets that box's feature (the paper's
query phase); a row without one gets every detection in the image. The result has one row
per box: ``path, x1, y1, x2, y2, score, feature`` (``score`` is NaN for query rows, ``feature``
a list of D floats, L2-normalised). An IDNet checkpoint only answers rows with boxes.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import mlflow.pyfunc
import torch

from psearch.config import PretrainConfig
from psearch.errors import PsearchError

BOX_COLUMNS = ["x1", "y1", "x2", "y2"]
OUTPUT_COLUMNS = ["path", *BOX_COLUMNS, "score", "feature"]
# IDNet crops when the checkpoint's meta does not say (older IDNet files).
DEFAULT_CROP_SIZE = (PretrainConfig.crop_height, PretrainConfig.crop_width)


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
    """[3, H, W] float in 0..1."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(path, mode=ImageReadMode.RGB).float().div_(255.0)
    except (RuntimeError, OSError) as exc:
        raise PsearchError(f"{path}: cannot read image ({exc})") from None


class PersonSearchModel(mlflow.pyfunc.PythonModel):
    # predict/load_context carry no type hints: MLflow would read them as a signature.
    def load_context(self, context):
        from psearch.models.io import load_model

        self.model, self.meta = load_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        import pandas as pd

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
        from psearch.models.idnet import IDNet

        image = read_image(path)
        if box is not None:
            boxes = torch.tensor([box], dtype=torch.float32)
            if isinstance(self.model, IDNet):
                feature = self.model.features(self._crop(image, box))[0]
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

    def _crop(self, image: torch.Tensor, box: list[float]) -> torch.Tensor:
        """[1, 3, h, w]: cut as IDNet's training crops are (psearch.data.crops)."""
        from psearch.data.crops import cut_crops

        height = int(self.meta.get("crop_height", DEFAULT_CROP_SIZE[0]))
        width = int(self.meta.get("crop_width", DEFAULT_CROP_SIZE[1]))
        return cut_crops(image, [box], (height, width), self.model.context)
