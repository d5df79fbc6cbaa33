"""Video footage as a gallery: frame sampling, extract --video, search/index/serve timestamps,
and the planted person found.

The footage (tests/video_fixtures.py) is a short clip of a synthetic street, encoded with PyAV,
with one person planted in known frames and another in others. Most tests use the random-init
fixture model, whose re-id features do not tell people apart: they check where frames come
from and that every answer carries the right frame and time. The ranking test uses a model
trained in under a minute on other frames of the same street (tests/video_fixtures.py).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import INFERENCE_OVERRIDES
from fastapi.testclient import TestClient
from PIL import Image
from video_fixtures import FPS, FRAMES, OTHER_FRAMES, PLANTED, PLANTED_BOX, SIZE

from psearch.cli import main
from psearch.data.manifest import gallery_detections_schema
from psearch.inference.index import GalleryIndex, build_index
from psearch.inference.render import CLIP_HOLD
from psearch.inference.search import format_result, search
from psearch.inference.video import (
    FRAMES_FILE,
    Sampling,
    frame_ref,
    read_frame,
    sample_frames,
)
from psearch.inference.video_extract import extract_video
from psearch.serving.app import create_app
from psearch.serving.service import SearchService


@pytest.fixture(scope="module")
def video_dets(footage, random_models, inference_params, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("video") / "dets"
    extract_video(
        footage["video"], str(random_models["joint"]), out, inference_params, every_frames=1
    )
    return out


def _planted_visible(pixels: np.ndarray, empty: np.ndarray) -> bool:
    """Whether the planted person's path (x 40..90) differs from the empty street."""
    x, y, _, h = PLANTED_BOX
    region = (slice(y, y + h), slice(x - 4, x + 48))
    return float(np.abs(pixels[region].astype(int) - empty[region].astype(int)).mean()) > 20


def test_sampling_takes_the_frames_asked_for(footage):
    def taken(sampling):
        return [(f.frame_index, f.time_s) for f in sample_frames(footage["video"], sampling)]

    assert taken(Sampling(every_frames=1)) == [(i, i / FPS) for i in range(FRAMES)]
    assert taken(Sampling(every_frames=5)) == [(0, 0.0), (5, 1.25), (10, 2.5)]
    assert taken(Sampling(every_seconds=1.0)) == [(0, 0.0), (4, 1.0), (8, 2.0)]
    # Not a multiple of the frame period: the first frame at or after each step.
    assert [i for i, _ in taken(Sampling(every_seconds=0.6))] == [0, 3, 5, 8, 10]


def test_extract_video_writes_the_contract_table_and_each_frames_time(video_dets, footage):
    detections = pq.read_table(video_dets / "gallery_detections.parquet")
    assert detections.schema.equals(gallery_detections_schema(32))
    frames = pq.read_table(video_dets / FRAMES_FILE).to_pydict()
    assert frames["image_id"] == list(range(FRAMES))
    assert frames["frame_index"] == list(range(FRAMES))
    assert frames["time_s"] == [i / FPS for i in range(FRAMES)]
    assert set(frames["video"]) == {str(footage["video"].resolve())}
    assert set(frames["width"]) == {SIZE[0]} and set(frames["height"]) == {SIZE[1]}
    assert set(detections.column("image_id").to_pylist()) <= set(range(FRAMES))
    info = json.loads((video_dets / "extraction.json").read_text())
    assert info["source"] == "video" and info["frames"] == FRAMES
    assert info["detections"] == detections.num_rows
    assert info["sampling"] == {"every_seconds": None, "every_frames": 1}
    assert info["frames_per_s"] > 0 and info["decode_frames_per_s"] > 0


def test_each_recorded_time_reads_back_its_frame(video_dets):
    """The planted person is exactly in the frames recorded at 1.0-1.75 s, read back by seeking."""
    frames = pq.read_table(video_dets / FRAMES_FILE).to_pylist()
    empty = read_frame(frames[3]["video"], 3, frames[3]["time_s"])
    streamed = {
        f.frame_index: f.pixels for f in sample_frames(frames[0]["video"], Sampling(1.0 / FPS))
    }
    visible = []
    for row in frames:
        pixels = read_frame(row["video"], row["frame_index"], row["time_s"])
        np.testing.assert_array_equal(pixels, streamed[row["frame_index"]])
        if _planted_visible(pixels, empty):
            visible.append(row["time_s"])
    assert visible == [i / FPS for i in PLANTED]


def test_search_answers_with_frames_and_times(video_dets, footage, random_models, inference_params):
    result = search(
        str(random_models["joint"]),
        footage["query"],
        list(PLANTED_BOX),
        video_dets,
        inference_params,
        top_k=FRAMES,
        det_thresh=0.0,
        out=footage["base"] / "matches.mp4",
    )
    assert result["source"] == "video"
    matches = result["matches"]
    assert sorted(m["frame"] for m in matches) == list(range(FRAMES))  # every frame once
    for match in matches:
        assert match["time_s"] == match["frame"] / FPS
        assert match["image"] == frame_ref(match["video"], match["time_s"])
    # The clip shows every match for CLIP_HOLD frames, in time order.
    clip = list(sample_frames(footage["base"] / "matches.mp4", Sampling(every_frames=1)))
    assert len(clip) == FRAMES * CLIP_HOLD
    rows = format_result(result, "csv").splitlines()
    assert rows[0].endswith(",video,frame,time_s") and len(rows) == FRAMES + 1
    first = rows[1].split(",")
    assert first[-2:] == [str(matches[0]["frame"]), str(matches[0]["time_s"])]
    assert json.loads(format_result(result, "json"))["matches"][0]["time_s"] == matches[0]["time_s"]


def test_index_and_serve_carry_times(video_dets, random_models, index_params, tmp_path):
    build_index(video_dets, tmp_path / "index", index_params)
    index = GalleryIndex(tmp_path / "index")
    assert [index.images[i].time_s for i in range(FRAMES)] == [i / FPS for i in range(FRAMES)]
    service = SearchService(tmp_path / "index", str(random_models["joint"]), index_params)
    try:
        client = TestClient(create_app(service))
        x, y, w, h = PLANTED_BOX
        answer = client.post("/search", data={"image_id": 5, "box": f"{x},{y},{w},{h}"})
        assert answer.status_code == 200, answer.text
        matches = answer.json()["matches"]
        assert matches and all(m["time_s"] == m["frame"] / FPS for m in matches)
        assert 5 not in {m["frame"] for m in matches}  # never the query's own frame
        image = client.get(matches[0]["image_url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(image.content)).size == SIZE
        assert client.get(matches[0]["crop_url"]).status_code == 200
        page = client.get("/images", params={"offset": 4, "limit": 1}).json()["images"]
        assert page[0]["frame"] == 4 and page[0]["time_s"] == 1.0
    finally:
        service.stop()


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("not a video", "not a readable video"),
        ("missing", "not found"),
        ("no videos in folder", "no video files"),
        ("zero seconds", "--every-seconds 0.0: must be a number > 0"),
        ("negative seconds", "--every-seconds -1.0: must be a number > 0"),
        ("zero frames", "--every-frames 0: must be at least 1"),
        ("sampling without video", "only used with --video"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    case, fragment, footage, random_models, tmp_path, capsys
):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n")
    (tmp_path / "empty").mkdir()
    source = {
        "not a video": ["--video", str(text)],
        "missing": ["--video", str(tmp_path / "gone.mp4")],
        "no videos in folder": ["--video", str(tmp_path / "empty")],
        "zero seconds": ["--video", str(footage["video"]), "--every-seconds", "0"],
        "negative seconds": ["--video", str(footage["video"]), "--every-seconds", "-1"],
        "zero frames": ["--video", str(footage["video"]), "--every-frames", "0"],
        "sampling without video": ["--manifests", str(tmp_path), "--every-seconds", "1"],
    }[case]
    sets = [item for override in INFERENCE_OVERRIDES for item in ("--set", override)]
    out = tmp_path / "dets"
    code = main(
        ["extract", *source, "--model", str(random_models["joint"]), "--out", str(out), *sets]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dets")] == []


def test_a_query_taken_from_a_frame_of_footage(
    video_dets, footage, random_models, tmp_path, capsys
):
    """--query VIDEO --query-time S: the person is cut from that frame (the same ranking as a
    still of the decoded frame), and the result names the frame."""
    sets = [item for override in INFERENCE_OVERRIDES for item in ("--set", override)]
    box = ",".join(str(v) for v in PLANTED_BOX)
    common = ["--model", str(random_models["joint"]), "--box", box, "--gallery", str(video_dets)]
    common += ["--det-thresh", "0", "--format", "json", *sets]
    at = 5 / FPS  # frame 5
    still = tmp_path / "frame5.png"
    Image.fromarray(read_frame(footage["video"], 5, at)).save(still)
    assert main(["search", "--query", str(footage["video"]), "--query-time", str(at), *common]) == 0
    from_video = json.loads(capsys.readouterr().out)
    assert main(["search", "--query", str(still), *common]) == 0
    from_still = json.loads(capsys.readouterr().out)
    assert from_video["query"] == frame_ref(footage["video"], at)
    assert [m["frame"] for m in from_video["matches"]] == [
        m["frame"] for m in from_still["matches"]
    ]
    # A video without a time, or a time past its end: one line, exit 2.
    for extra, fragment in (([], "needs --query-time"), (["--query-time", "99"], "no frame at")):
        assert main(["search", "--query", str(footage["video"]), *extra, *common]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and fragment in err, err


def _settings() -> list[str]:
    return [item for override in INFERENCE_OVERRIDES for item in ("--set", override)]


@pytest.mark.slow
def test_the_planted_person_ranks_first(footage, street_model, tmp_path, capsys):
    """`psearch extract --video`, then `psearch search` with a box on the planted person in
    frame 5 of the footage, every detection competing (--det-thresh 0): the four frames
    holding them rank first, at their times, above the other person's frames."""
    dets = tmp_path / "dets"
    extract = ["extract", "--video", str(footage["video"]), "--every-frames", "1"]
    assert main([*extract, "--model", str(street_model), "--out", str(dets), *_settings()]) == 0
    box = ",".join(str(v) for v in PLANTED_BOX)
    query = ["--query", str(footage["video"]), "--query-time", str(5 / FPS), "--box", box]
    argv = ["search", *query, "--model", str(street_model), "--gallery", str(dets)]
    argv += ["--det-thresh", "0", "--top-k", str(FRAMES), "--format", "json"]
    capsys.readouterr()
    assert main([*argv, *_settings()]) == 0
    matches = json.loads(capsys.readouterr().out)["matches"]
    top, rest = matches[: len(PLANTED)], matches[len(PLANTED) :]
    assert sorted(m["frame"] for m in top) == list(PLANTED), matches
    assert sorted(m["time_s"] for m in top) == [f / FPS for f in PLANTED]
    for m in top:  # the match is the planted person, not another box of those frames
        x1 = PLANTED_BOX[0] + 4 * (m["frame"] - 5)
        assert x1 <= (m["box"][0] + m["box"][2]) / 2 <= x1 + PLANTED_BOX[2], m
    assert set(OTHER_FRAMES) <= {m["frame"] for m in rest}  # found, and ranked below
    assert max(m["similarity"] for m in rest) < min(m["similarity"] for m in top)
