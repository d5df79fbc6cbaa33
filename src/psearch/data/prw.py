"""Reading a PRW layout (docs/data.md) into a `ParsedDataset`.

Frames come from frame_train.mat / frame_test.mat, boxes from one
annotations/<frame>.jpg.mat per frame (`box_new`, in a few files `anno_file`
or `anno_previous`: N x 5 rows [id x y w h], id -2 = unlabelled), queries from
query_info.txt. PRW's protocol is the whole test set: gallery_size -1, whose
rows list the test frames holding the query person (its own frame excluded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from psearch.data import matfiles as mf
from psearch.data.records import Gallery, ParsedDataset, plain_file_name
from psearch.errors import PsearchError

BOX_VARIABLES = ("box_new", "anno_file", "anno_previous")
QUERY_FILES = ("query_info.txt", "query_info_2057.txt")
QUERY_MATCH_PX = 1.0  # query_info.txt prints boxes as text; allow that rounding


def read_prw(root: Path) -> ParsedDataset:
    train = _frame_list(root / "frame_train.mat", "img_index_train")
    test = _frame_list(root / "frame_test.mat", "img_index_test")
    frames = train + test
    seen: set[str] = set()
    for name in frames:
        if name in seen:
            raise PsearchError(
                f"{root}: duplicate frame name {name} in frame_train.mat / frame_test.mat"
            )
        seen.add(name)
    splits = ["train"] * len(train) + ["test"] * len(test)
    frame_of = {name: i for i, name in enumerate(frames)}

    rows, box_image, dropped, files = [], [], 0, []
    for i, name in enumerate(frames):
        path = root / "annotations" / f"{name}.jpg.mat"
        _, value = mf.load_variable(path, BOX_VARIABLES)
        mat = mf.matrix(value, 5, str(path))
        keep = (mat[:, 3] > 0) & (mat[:, 4] > 0)
        dropped += int((~keep).sum())
        rows.append(mat[keep])
        box_image.append(np.full(int(keep.sum()), i, dtype=np.int32))
        files.append(path)
    table = np.concatenate(rows) if rows else np.zeros((0, 5))
    box_image_arr = np.concatenate(box_image) if box_image else np.zeros(0, dtype=np.int32)
    raw_id = table[:, 0].astype(np.int64)
    is_test_box = np.array([splits[i] == "test" for i in box_image_arr], dtype=bool)

    train_ids = sorted(set(raw_id[(raw_id >= 0) & ~is_test_box].tolist()))
    test_ids = sorted(set(raw_id[(raw_id >= 0) & is_test_box].tolist()) - set(train_ids))
    dense = {pid: k for k, pid in enumerate(train_ids + test_ids)}
    person = np.array([dense.get(int(p), -1) if p >= 0 else -1 for p in raw_id], dtype=np.int32)

    query_path = next((root / f for f in QUERY_FILES if (root / f).is_file()), None)
    if query_path is None:
        raise PsearchError(f"{root}: no {' or '.join(QUERY_FILES)} found")
    queries = _read_queries(query_path, frame_of, box_image_arr, raw_id, table)
    query_person = np.array([dense[q[0]] for q in queries], dtype=np.int32)
    query_image = np.array([q[1] for q in queries], dtype=np.int32)
    query_xywh = np.array([q[2] for q in queries], dtype=np.float64).reshape(-1, 4)

    gallery = _whole_test_gallery(queries, raw_id, box_image_arr, is_test_box, table)
    files += [root / "frame_train.mat", root / "frame_test.mat", query_path]
    return ParsedDataset(
        name="PRW",
        format="prw",
        image_names=[f"{n}.jpg" for n in frames],
        image_paths=[f"frames/{n}.jpg" for n in frames],
        image_splits=splits,
        box_image=box_image_arr,
        box_xywh=table[:, 1:5].copy(),
        box_person=person,
        box_hard=np.zeros(len(table), dtype=bool),
        person_names=[str(p) for p in train_ids + test_ids],
        person_splits=["train"] * len(train_ids) + ["test"] * len(test_ids),
        query_person=query_person,
        query_image=query_image,
        query_xywh=query_xywh,
        query_occluded=np.zeros(len(queries), dtype=bool),
        query_low_resolution=np.zeros(len(queries), dtype=bool),
        galleries=[gallery],
        annotation_files=files,
        info={
            "dropped_zero_size_boxes": dropped,
            "subsets": {
                "occlusion": {"source": "not defined for PRW", "queries": 0},
                "low_resolution": {"source": "not defined for PRW", "queries": 0},
            },
            "camera": "derived from the frame name c<cam>s<seq>_<frame>; the evaluator applies "
            "the cross-camera convention (evaluate.cross_camera) from it",
        },
    )


def _frame_list(path: Path, var: str) -> list[str]:
    _, value = mf.load_variable(path, var)
    names = mf.strings(value, f"{path}: {var}")
    for i, name in enumerate(names):  # a frame name becomes an image and an annotation path
        plain_file_name(name, f"{path}: {var}({i + 1})")
    return [n[:-4] if n.lower().endswith(".jpg") else n for n in names]


def _read_queries(path: Path, frame_of, box_image, raw_id, table):
    """(raw id, frame index, [x y w h]) per line of query_info.txt, each matched to its frame's box."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PsearchError(f"{path}: cannot read ({type(exc).__name__})") from None
    queries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            pid, box, frame = int(float(parts[0])), tuple(float(v) for v in parts[1:5]), parts[5]
        except (ValueError, IndexError):
            raise PsearchError(
                f"{path}:{number}: expected 'id x y w h frame', got {line.strip()!r}"
            ) from None
        frame = frame[:-4] if frame.lower().endswith(".jpg") else frame
        if frame not in frame_of:
            raise PsearchError(
                f"{path}:{number}: frame {frame} is not in frame_train.mat or frame_test.mat"
            )
        image = frame_of[frame]
        candidates = np.flatnonzero((box_image == image) & (raw_id == pid))
        close = [c for c in candidates if np.all(np.abs(table[c, 1:5] - box) <= QUERY_MATCH_PX)]
        if not close:
            raise PsearchError(
                f"{path}:{number}: query box of person {pid} matches no annotated box in {frame}"
            )
        queries.append((pid, image, box))
    return queries


def _whole_test_gallery(queries, raw_id, box_image, is_test_box, table) -> Gallery:
    """Per query, the test frames holding the person (first box there), own frame excluded."""
    q_col, img_col, gt = [], [], []
    for qi, (pid, image, _) in enumerate(queries):
        holding = np.flatnonzero((raw_id == pid) & is_test_box & (box_image != image))
        _, first = np.unique(box_image[holding], return_index=True)
        for k in holding[first]:
            q_col.append(qi)
            img_col.append(int(box_image[k]))
            gt.append(table[k, 1:5])
    return Gallery(
        -1,
        np.array(q_col, dtype=np.int32),
        np.array(img_col, dtype=np.int32),
        np.array(gt, dtype=np.float64).reshape(-1, 4),
    )
