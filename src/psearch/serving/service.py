"""The search service behind `psearch serve`: one index and one model, swapped as a whole.

A `Snapshot` (the loaded index, the loaded model and what identifies them) never changes once
built; every request takes the current snapshot once and uses only it. `SearchService.reload`
builds a new snapshot off to the side when the model's source moved (the registry alias now
names another version, or a local model file changed) or the index directory was rebuilt, then
swaps the reference: requests in flight finish on the old one, none is dropped or mixed.

The model is a psearch model (file, directory or MLflow URI; run by PyTorch), or a file from
`psearch export`: a .onnx file runs on onnxruntime (CPU), a TorchScript archive on torch.jit.
Either answers the query path (a box's feature) with the same weights as the PyTorch net;
an exported graph keeps the test-time settings (resize) it was exported with.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from psearch import __version__
from psearch.config import Params
from psearch.errors import PsearchError
from psearch.inference import engine
from psearch.inference.index import INDEX_JSON, GalleryIndex, weights_fingerprint
from psearch.inference.loading import load_idnet, load_joint, resolve_device
from psearch.models.io import resolve_model_file
from psearch.serving.export import ExportedModel, exported_format
from psearch.tracking import tracking_uri

log = logging.getLogger("psearch.serve")


# ---------------------------------------------------------------------------
# where the model comes from, and how to tell that it moved


def parse_alias_uri(uri: str) -> tuple[str, str] | None:
    """('person-search', 'champion') for models:/person-search@champion, else None."""
    if not uri.startswith("models:/") or "@" not in uri:
        return None
    name, _, alias = uri[len("models:/") :].partition("@")
    return (name, alias) if name and alias and "/" not in alias else None


def is_local(uri: str) -> bool:
    return "://" not in uri and not uri.startswith(("models:/", "runs:/"))


@dataclass(frozen=True)
class ModelSource:
    """A model URI and how to ask what it currently names (a version key)."""

    uri: str
    tracking_uri: str | None = None

    def current(self) -> tuple[str, str]:
        """(version key, URI to load exactly that version). The key changes when the source
        names other weights: a registry version, or a local file's size and time."""
        alias = parse_alias_uri(self.uri)
        if alias is not None:
            name, alias_name = alias
            version = self._client().get_model_version_by_alias(name, alias_name).version
            return f"{name}/{version}", f"models:/{name}/{version}"
        if is_local(self.uri):
            path = resolve_model_file(Path(self.uri))
            stat = path.stat()
            return f"{path}@{stat.st_mtime_ns}:{stat.st_size}", str(path)
        return self.uri, self.uri  # runs:/, models:/name/version: immutable

    def _client(self):
        import mlflow  # lazy: only a registry alias needs MLflow

        return mlflow.MlflowClient(self.tracking_uri)


def index_stamp(path: Path) -> str:
    """Changes whenever `psearch index` rewrites the directory (it is replaced as a whole)."""
    stat = (Path(path) / INDEX_JSON).stat()
    return f"{stat.st_ino}:{stat.st_mtime_ns}"


# ---------------------------------------------------------------------------
# one consistent state


@dataclass
class Snapshot:
    index: GalleryIndex
    index_stamp: str
    model_uri: str
    source_key: str
    fingerprint: str
    joint: Any
    runtime: str = "pytorch"
    idnet: Any = None
    crop_size: tuple[int, int] | None = None
    loaded_at: float = field(default_factory=time.time)

    @property
    def model_version(self) -> str:
        """The registry's NAME/VERSION, else the first 12 hex digits of the weights' sha256."""
        if self.model_uri.startswith("models:/"):
            return self.model_uri[len("models:/") :]
        return self.fingerprint[: len("sha256:") + 12]

    @property
    def index_matches_model(self) -> bool:
        return self.fingerprint == (self.index.meta.get("model") or {}).get("fingerprint")

    def version(self) -> dict[str, Any]:
        meta = self.index.meta
        return {
            "psearch": __version__,
            "model": {
                "uri": self.model_uri,
                "version": self.model_version,
                "fingerprint": self.fingerprint,
                "runtime": self.runtime,
            },
            "index": {
                "path": str(self.index.path),
                "kind": meta.get("kind"),
                "detections": len(self.index),
                "images": len(self.index.images),
                "model_uri": (meta.get("model") or {}).get("uri"),
                "model_fingerprint": (meta.get("model") or {}).get("fingerprint"),
                "features": meta.get("features"),
            },
            "data_version": meta.get("data_version"),
            "index_matches_model": self.index_matches_model,
            "loaded_at": self.loaded_at,
        }


class SearchService:
    """Loads snapshots, answers feature and search calls, reloads when sources move."""

    def __init__(self, index: Path, model: str, params: Params, device: str | None = None):
        self.index_path = Path(index)
        self.params = params
        self.source = ModelSource(
            model, tracking_uri(params.tracking) if parse_alias_uri(model) else None
        )
        self.device = resolve_device(device or params.extract.device)
        self.amp = bool(params.extract.amp)
        # One forward pass at a time: on a few cores, parallel passes only slow each other down.
        self._forward = threading.Lock()
        self._reloading = threading.Lock()
        self._stop = threading.Event()
        self.reload_error: str | None = None
        self.current = self._load(*self.source.current())

    def _load(self, version: str, uri: str, index: GalleryIndex | None = None) -> Snapshot:
        stamp = index_stamp(self.index_path)
        index = index or GalleryIndex(self.index_path)
        idnet, crop = None, None
        if is_local(uri) and exported_format(uri):
            joint = _load_exported(Path(uri), index)
            runtime, fingerprint = joint.runtime, joint.meta.get("fingerprint", "unknown")
        else:
            joint, _ = load_joint(uri, self.params, self.device)
            runtime, fingerprint = "pytorch", weights_fingerprint(joint)
            if index.meta.get("features") == "idnet":
                idnet, crop = load_idnet(index.meta["idnet"], self.params, self.device)
        snapshot = Snapshot(
            index=index,
            index_stamp=stamp,
            model_uri=uri,
            source_key=version,
            fingerprint=fingerprint,
            joint=joint,
            runtime=runtime,
            idnet=idnet,
            crop_size=crop,
        )
        if not snapshot.index_matches_model:
            log.warning(
                "model %s is not the model that built the index %s: similarities are only "
                "meaningful for the same model (rebuild it with psearch index)",
                version,
                self.index_path,
            )
        return snapshot

    def reload(self) -> bool:
        """Swap in a new snapshot if the model alias/file or the index moved; True if swapped.
        A failed reload keeps serving the current snapshot (and says why in reload_error)."""
        with self._reloading:
            current = self.current
            try:
                version, uri = self.source.current()
                stamp = index_stamp(self.index_path)
                if version == current.source_key and stamp == current.index_stamp:
                    self.reload_error = None
                    return False
                keep = current.index if stamp == current.index_stamp else None
                self.current = self._load(version, uri, keep)
            except Exception as exc:  # noqa: BLE001
                # Whatever broke (registry down, half-copied file), the old snapshot still works.
                self.reload_error = " ".join(str(exc).split()) or type(exc).__name__
                log.warning("reload failed, still serving %s: %s", current.model_version, exc)
                return False
            self.reload_error = None
            log.info("now serving model %s", self.current.model_version)
            return True

    def watch(self, interval: float) -> threading.Thread | None:
        """Check for a moved alias / rebuilt index every `interval` seconds (0 = never)."""
        if interval <= 0:
            return None

        def loop():
            while not self._stop.wait(interval):
                self.reload()

        thread = threading.Thread(target=loop, name="psearch-reload", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def query_feature(self, snapshot: Snapshot, image: torch.Tensor, box_xyxy) -> np.ndarray:
        """The feature of one box in a uint8 [3, H, W] image, as the index's features were made."""
        boxes = [np.asarray([box_xyxy], np.float32)]
        if isinstance(snapshot.joint, ExportedModel):
            pixels = image.numpy().astype(np.float32) / 255  # as engine.as_float
            with self._forward:
                return snapshot.joint.query_features(pixels, boxes[0])[0]
        if snapshot.idnet is not None:
            step = engine.idnet_box_step(snapshot.idnet, boxes, snapshot.crop_size, self.amp)
        else:
            step = engine.box_feature_step(snapshot.joint, boxes, self.amp)
        with self._forward:
            (features,) = step([0], [image.to(self.device)])
        return features[0]


def _load_exported(path: Path, index: GalleryIndex) -> ExportedModel:
    """An exported model that can answer queries over `index`, else a one-line error."""
    if index.meta.get("features") == "idnet":
        raise PsearchError(
            f"{path}: the index holds IDNet features (Deep + IDNet), which an exported joint "
            "model does not compute; serve it with the psearch models"
        )
    model = ExportedModel(path)
    dim = model.meta.get("feat_dim")
    if dim is not None and dim != index.dim:
        raise PsearchError(f"{path}: gives {dim}-d features but the index holds {index.dim}-d")
    return model
