"""psearch serve's API through FastAPI's test client: answers, 4xx JSON errors, reloads."""

from __future__ import annotations

import io
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from psearch.models.io import load_model, save_model
from psearch.serving.app import create_app
from psearch.serving.images import MAX_UPLOAD_BYTES
from psearch.serving.service import SearchService, parse_alias_uri


@pytest.fixture(scope="module")
def client(search_service):
    return TestClient(create_app(search_service))


def _png(image_path: str) -> bytes:
    out = io.BytesIO()
    Image.open(image_path).save(out, "PNG")
    return out.getvalue()


def test_health_version_and_gallery(client, search_service):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["detections"] == len(search_service.current.index)
    version = client.get("/version").json()
    assert version["index_matches_model"] is True
    assert version["data_version"] == "sha256:scenes"
    assert version["model"]["fingerprint"] == version["index"]["model_fingerprint"]
    page = client.get("/images", params={"offset": 2, "limit": 3}).json()
    assert page["total"] == 8 and [i["image_id"] for i in page["images"]] == [4, 5, 6]
    image = client.get("/images/4")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (160, 120)
    found = client.get("/images/4/detections").json()
    assert found["width"] == 160 and len(found["detections"]) > 0
    crop = client.get(found["detections"][0]["crop_url"])
    assert crop.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(crop.content)).height == 160
    assert "/search" in client.get("/openapi.json").json()["paths"]
    page_html = client.get("/")
    assert page_html.status_code == 200 and "/static/app.js" in page_html.text
    assert "http" not in client.get("/static/app.js").text.replace("http://www.w3.org", "")


def test_search_by_gallery_box_upload_and_detection_agree(client, search_service):
    index = search_service.current.index
    path = index.images[3].path
    by_id = client.post("/search", data={"image_id": 3, "box": "30,10,30,80", "top_k": 5})
    assert by_id.status_code == 200, by_id.text
    body = by_id.json()
    assert body["query"]["box"] == [30, 10, 60, 90] and len(body["matches"]) == 5
    assert 3 not in {m["image_id"] for m in body["matches"]}  # never the query's own image
    assert [m["rank"] for m in body["matches"]] == [1, 2, 3, 4, 5]
    sims = [m["similarity"] for m in body["matches"]]
    assert sims == sorted(sims, reverse=True)
    for match in body["matches"]:
        assert match["crop_url"] == f"/crops/{match['detection_id']}"
        assert index.detection(match["detection_id"])["image_id"] == match["image_id"]

    upload = client.post(
        "/search",
        files={"image": ("q.png", _png(path), "image/png")},
        data={"box": "30,10,30,80", "top_k": 5},
    ).json()
    # The same pixels give the same feature; an upload excludes no gallery image.
    assert upload["query"]["image_id"] is None
    same = [m for m in upload["matches"] if m["image_id"] != 3][:4]
    assert [m["similarity"] for m in same] == pytest.approx(sims[:4], abs=1e-5)

    detection = int(index.detections_of(3)[0])
    by_detection = client.post("/search", data={"detection_id": detection}).json()
    assert by_detection["query"]["image_id"] == 3 and len(by_detection["matches"]) == 7


@pytest.mark.parametrize(
    "request_kwargs, status, fragment",
    [
        (dict(files={"image": ("x.png", b"not an image", "image/png")}, data={"box": "1,1,5,5"}), 400, "not an image"),
        (dict(data={"image_id": 3, "box": "170,10,30,80"}), 400, "outside the image"),
        (dict(data={"image_id": 3, "box": "10,10,0,80"}), 422, "empty"),
        (dict(data={"image_id": 3, "box": "10,10,nan,80"}), 422, "expected x,y,w,h"),
        (dict(data={"image_id": 3, "box": "a,b"}), 422, "expected x,y,w,h"),
        (dict(data={"image_id": 999, "box": "1,1,5,5"}), 404, "image 999"),
        (dict(data={"detection_id": 10**9}), 404, "detection 1000000000"),
        (dict(data={"detection_id": -1}), 404, "detection -1"),
        (dict(data={"image_id": 3}), 422, "box: required"),
        (dict(data={"box": "1,1,5,5"}), 422, "exactly one of image"),
        (dict(data={"image_id": 3, "box": "1,1,5,5", "top_k": 0}), 422, "top_k"),
        (dict(data={"image_id": "three", "box": "1,1,5,5"}), 422, "image_id"),
        (dict(data={"detection_id": 1, "image_id": 3}), 422, "give it alone"),
    ],
    ids=[
        "not-an-image", "box-outside", "empty-box", "nan-box", "short-box", "unknown-image",
        "unknown-detection", "negative-detection", "no-box", "no-image", "top-k-zero",
        "image-id-text", "detection-and-image",
    ],
)  # fmt: skip
def test_bad_input_is_a_json_4xx(client, request_kwargs, status, fragment):
    response = client.post("/search", **request_kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and fragment in body["error"]


def test_other_bad_requests(client):
    assert client.get("/images/12345").json() == {
        "error": "image 12345: not in the gallery",
        "status": 404,
    }
    assert client.get("/crops/99999").status_code == 404
    assert client.get("/images", params={"limit": 0}).status_code == 422
    assert client.get("/nowhere").json()["status"] == 404
    big = b"\x89PNG" + b"\0" * (MAX_UPLOAD_BYTES + 100_000)
    response = client.post(
        "/search", files={"image": ("big.png", big, "image/png")}, data={"box": "1,1,5,5"}
    )
    assert response.status_code == 413 and "more than" in response.json()["error"]
    # A small file claiming enormous dimensions is refused from its header.
    bomb = io.BytesIO()
    Image.new("L", (9000, 9000)).save(bomb, "PNG")
    response = client.post(
        "/search",
        files={"image": ("bomb.png", bomb.getvalue(), "image/png")},
        data={"box": "1,1,5,5"},
    )
    assert response.status_code == 413 and "pixels" in response.json()["error"]


def test_reload_swaps_the_model_without_dropping_requests(
    scene_index, random_models, index_params, tmp_path
):
    model_file = tmp_path / "model.pt"
    shutil.copy(random_models["joint"], model_file)
    service = SearchService(scene_index, str(model_file), index_params)
    client = TestClient(create_app(service))
    before = client.get("/version").json()
    assert client.post("/reload").json()["reloaded"] is False

    statuses, stop = [], threading.Event()

    def hammer():
        while not stop.is_set():
            statuses.append(
                client.post("/search", data={"image_id": 3, "box": "30,10,30,80"}).status_code
            )

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for thread in threads:
        thread.start()
    model, _ = load_model(model_file)
    for parameter in model.parameters():
        parameter.data.mul_(1.01)
    save_model(model_file, model)
    swapped = client.post("/reload").json()
    stop.set()
    for thread in threads:
        thread.join()
    assert swapped["reloaded"] is True and statuses and set(statuses) == {200}
    after = client.get("/version").json()
    assert after["model"]["fingerprint"] != before["model"]["fingerprint"]
    assert after["index_matches_model"] is False
    # A broken source keeps the last good model and says why.
    model_file.write_bytes(b"garbage")
    assert client.post("/reload").json()["reloaded"] is False
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["reload_error"]
    assert client.post("/search", data={"image_id": 3, "box": "30,10,30,80"}).status_code == 200


def test_alias_uris():
    assert parse_alias_uri("models:/person-search@champion") == ("person-search", "champion")
    assert parse_alias_uri("models:/person-search/3") is None
    assert parse_alias_uri("runs/model") is None


def test_index_never_changes_under_a_request(search_service):
    # Snapshots are whole: a request holds one and never sees a half-swapped state.
    snapshot = search_service.current
    assert snapshot.index is search_service.current.index
    assert isinstance(snapshot.index.search(np.ones(32, np.float32), 2), list)
    assert Path(snapshot.index.path).is_dir()
