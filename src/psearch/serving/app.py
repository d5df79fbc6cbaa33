"""The HTTP API and web page of `psearch serve` (FastAPI).

    GET  /                        the search page (static files shipped in the package)
    POST /search                  a box in an uploaded image, in a gallery image, or a detection
                                  -> the gallery images ranked by their most similar detection
    GET  /images                  the gallery's images (paged)
    GET  /images/{id}             one gallery image (the file; a video frame as JPEG)
    GET  /images/{id}/detections  its indexed detections
    GET  /crops/{detection_id}    a detection's crop (JPEG)
    GET  /healthz, GET /version   liveness; the model, index and data versions
    POST /reload                  check now whether the champion alias or the index moved

Over a video gallery (psearch extract --video), matches and images also carry their video,
frame index and time in seconds.

Every error is JSON `{"error": "...", "status": N}`; bad input is a 4xx, never a 500. Each
request reads the service's current snapshot once, so a reload never mixes two models.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from psearch import __version__
from psearch.errors import PsearchError
from psearch.inference.index import GalleryImage
from psearch.serving.images import (
    MAX_UPLOAD_BYTES,
    BadImage,
    decode_upload,
    frame_jpeg,
    read_image,
    render_crop,
)
from psearch.serving.service import SearchService, Snapshot

STATIC = resources.files("psearch.serving") / "static"
MAX_TOP_K = 100
# Multipart framing around the file may add a little to the upload itself.
MAX_BODY_BYTES = MAX_UPLOAD_BYTES + 64 * 1024
IMAGE_MEDIA_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
}


# ---------------------------------------------------------------------------
# response shapes (they make the OpenAPI schema)


class ErrorBody(BaseModel):
    error: str
    status: int


class Detection(BaseModel):
    detection_id: int
    image_id: int
    box: list[float] = Field(description="x1, y1, x2, y2 in pixels")
    score: float = Field(description="detection score")
    crop_url: str


class FramePlace(BaseModel):
    """Where a video gallery's frame is; all null for an image gallery."""

    video: str | None = Field(None, description="the video file the frame was sampled from")
    frame: int | None = Field(None, description="frame index in the video, 0-based")
    time_s: float | None = Field(None, description="seconds from the start of the video")


class Match(Detection, FramePlace):
    rank: int
    similarity: float = Field(description="inner product of the re-id features")
    image_url: str


class QueryEcho(BaseModel):
    image_id: int | None
    detection_id: int | None
    box: list[float] = Field(description="x1, y1, x2, y2 in pixels")
    width: int
    height: int


class SearchResult(BaseModel):
    query: QueryEcho
    matches: list[Match]
    model_version: str
    index_matches_model: bool
    seconds: float


class GalleryImageInfo(FramePlace):
    image_id: int
    width: int
    height: int
    detections: int
    url: str


class GalleryPage(BaseModel):
    total: int
    offset: int
    images: list[GalleryImageInfo]


class ImageDetections(BaseModel):
    image_id: int
    width: int
    height: int
    url: str
    detections: list[Detection]


class Health(BaseModel):
    status: str
    detections: int
    model_version: str
    reload_error: str | None


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 404, 413, 422)
}


# ---------------------------------------------------------------------------
# helpers


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def parse_box(text: str) -> list[float]:
    """'x,y,w,h' (pixels) -> [x1, y1, x2, y2]; HTTP 422 when malformed or empty."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise HTTPException(
            422, f"box {text[:60]!r}: expected x,y,w,h in pixels, e.g. 10,20,40,100"
        )
    x, y, w, h = values
    if w < 1 or h < 1:
        raise HTTPException(422, f"box {text[:60]!r}: empty (width and height must be >= 1 pixel)")
    return [x, y, x + w, y + h]


def _check_inside(box: list[float], width: int, height: int) -> None:
    x1, y1, x2, y2 = box
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        shown = f"{x1:g},{y1:g},{x2 - x1:g},{y2 - y1:g}"
        raise HTTPException(400, f"box {shown}: outside the image ({width}x{height})")


def _detection(snapshot: Snapshot, detection_id: int) -> dict[str, Any]:
    if not 0 <= detection_id < len(snapshot.index):
        raise HTTPException(404, f"detection {detection_id}: not in the index")
    found = snapshot.index.detection(detection_id)
    found["crop_url"] = f"/crops/{detection_id}"
    return found


def _gallery_image(snapshot: Snapshot, image_id: int):
    image = snapshot.index.images.get(image_id)
    if image is None:
        raise HTTPException(404, f"image {image_id}: not in the gallery")
    return image


# ---------------------------------------------------------------------------
# the app


def create_app(service: SearchService) -> FastAPI:
    app = FastAPI(
        title="psearch",
        version=__version__,
        description="Person search over a gallery index: draw a box on a person, find them "
        "in every other image.",
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return _error(422, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return _error(413, f"request body of {length} bytes: more than {MAX_BODY_BYTES}")
        return await call_next(request)

    @app.get("/healthz", response_model=Health)
    def healthz():
        snapshot = service.current
        return Health(
            status="ok",
            detections=len(snapshot.index),
            model_version=snapshot.model_version,
            reload_error=service.reload_error,
        )

    @app.get("/version")
    def version() -> dict[str, Any]:
        return service.current.version()

    @app.post("/reload")
    def reload() -> dict[str, Any]:
        swapped = service.reload()
        return {"reloaded": swapped, "error": service.reload_error, **service.current.version()}

    @app.get("/images", response_model=GalleryPage)
    def list_images(
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ):
        snapshot = service.current
        ids = sorted(snapshot.index.images)
        page = [snapshot.index.images[i] for i in ids[offset : offset + limit]]
        return GalleryPage(
            total=len(ids),
            offset=offset,
            images=[
                GalleryImageInfo(
                    image_id=image.image_id,
                    width=image.width,
                    height=image.height,
                    detections=len(snapshot.index.detections_of(image.image_id)),
                    url=f"/images/{image.image_id}",
                    **image.where(),
                )
                for image in page
            ],
        )

    @app.get(
        "/images/{image_id}",
        response_class=FileResponse,
        responses={404: {"model": ErrorBody}, 200: {"content": {"image/*": {}}}},
    )
    def get_image(image_id: int):
        image = _gallery_image(service.current, image_id)
        if image.video is not None:
            try:
                data = frame_jpeg(image)
            except PsearchError:
                raise HTTPException(404, f"image {image_id}: its video cannot be read") from None
            return Response(
                data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"}
            )
        path = Path(image.path)
        if not path.is_file():
            raise HTTPException(404, f"image {image_id}: its file is gone ({path.name})")
        return FileResponse(path, media_type=IMAGE_MEDIA_TYPES.get(path.suffix.lower()))

    @app.get("/images/{image_id}/detections", response_model=ImageDetections, responses=ERRORS)
    def image_detections(image_id: int):
        snapshot = service.current
        image = _gallery_image(snapshot, image_id)
        rows = snapshot.index.detections_of(image_id)
        return ImageDetections(
            image_id=image_id,
            width=image.width,
            height=image.height,
            url=f"/images/{image_id}",
            detections=[Detection(**_detection(snapshot, int(row))) for row in rows],
        )

    @app.get(
        "/crops/{detection_id}",
        responses={404: {"model": ErrorBody}, 200: {"content": {"image/jpeg": {}}}},
    )
    def crop(detection_id: int):
        snapshot = service.current
        found = _detection(snapshot, detection_id)
        image = snapshot.index.images[found["image_id"]]
        try:
            data = _crop(image, tuple(found["box"]))
        except (OSError, PsearchError):
            raise HTTPException(404, f"image {image.image_id}: its file cannot be read") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post("/search", response_model=SearchResult, responses=ERRORS)
    def search(
        image: Annotated[
            UploadFile | None, File(description="a query image (or give image_id)")
        ] = None,
        image_id: Annotated[int | None, Form(description="a gallery image as the query")] = None,
        box: Annotated[
            str | None, Form(description="the person's box x,y,w,h in pixels, e.g. 10,20,40,100")
        ] = None,
        detection_id: Annotated[
            int | None, Form(description="an indexed detection as the query (no box needed)")
        ] = None,
        top_k: Annotated[int, Form(ge=1, le=MAX_TOP_K)] = 10,
    ):
        started = time.perf_counter()
        snapshot = service.current
        pixels, width, height, query_box, query_image = _query(
            snapshot, image, image_id, box, detection_id
        )
        feature = service.query_feature(snapshot, pixels, query_box)
        exclude = {query_image} if query_image is not None else set()
        matches = snapshot.index.search(feature, top_k, exclude)
        return SearchResult(
            query=QueryEcho(
                image_id=query_image,
                detection_id=detection_id,
                box=[round(v, 2) for v in query_box],
                width=width,
                height=height,
            ),
            matches=[
                Match(
                    **{k: v for k, v in m.items() if k != "image"},
                    crop_url=f"/crops/{m['detection_id']}",
                    image_url=f"/images/{m['image_id']}",
                )
                for m in matches
            ],
            model_version=snapshot.model_version,
            index_matches_model=snapshot.index_matches_model,
            seconds=round(time.perf_counter() - started, 4),
        )

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    return app


def _query(snapshot: Snapshot, upload, image_id, box, detection_id):
    """(uint8 image, width, height, box x1y1x2y2, gallery image id or None) of a search."""
    if detection_id is not None:
        if upload is not None or image_id is not None or box is not None:
            raise HTTPException(422, "detection_id: give it alone (not with image, image_id, box)")
        found = _detection(snapshot, detection_id)
        image_id, query_box = found["image_id"], found["box"]
    else:
        if (upload is None) == (image_id is None):
            raise HTTPException(422, "give exactly one of image (a file) or image_id, with box")
        if box is None:
            raise HTTPException(422, "box: required with image or image_id (x,y,w,h)")
        query_box = parse_box(box)
    if upload is not None:
        data = upload.file.read(MAX_UPLOAD_BYTES + 1)
        try:
            pixels = decode_upload(data)
        except BadImage as exc:
            raise HTTPException(exc.status, f"image {upload.filename or ''!s}: {exc}") from None
    else:
        gallery = _gallery_image(snapshot, image_id)
        try:
            pixels = read_image(gallery)
        except (RuntimeError, OSError, PsearchError):
            raise HTTPException(404, f"image {image_id}: its file cannot be read") from None
    height, width = int(pixels.shape[1]), int(pixels.shape[2])
    _check_inside(query_box, width, height)
    return pixels, width, height, query_box, image_id


@lru_cache(maxsize=4096)
def _crop(image: GalleryImage, box: tuple[float, ...]) -> bytes:
    return render_crop(image, list(box))
