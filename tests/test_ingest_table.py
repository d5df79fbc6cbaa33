"""`psearch ingest --format table`: a table written from the synthetic data gives the CUHK-SYSU
reader's manifests where the formats overlap; drawn queries and galleries follow the rule;
bad rows are one-line errors naming file, row and column, and nothing is written."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from psearch.cli import main
from psearch.data.ingest import ingest
from psearch.data.manifest import read_manifests
from psearch.data.table import TableOptions

BOX = ("x1", "y1", "x2", "y2")


def _rows_from_manifests(m) -> tuple[list[dict], list[dict]]:
    """One row per box (and a box-less row per empty image); the queries as a second table."""
    images = m.images.to_pylist()
    names = dict(
        zip(*m.persons.select(["person_id", "person_name"]).to_pydict().values(), strict=True)
    )
    by_image: dict[int, list[dict]] = {}
    for b in m.boxes.to_pylist():
        by_image.setdefault(b["image_id"], []).append(b)
    rows = []
    for img in images:
        base = {"image": img["path"], "split": img["split"]}
        for b in by_image.get(img["image_id"], []):
            who = names[b["person_id"]] if b["person_id"] >= 0 else None
            rows.append(
                {**base, **{k: b[k] for k in BOX}, "person_id": who, "is_hard": b["is_hard"]}
            )
        if img["image_id"] not in by_image:
            rows.append({**base, **dict.fromkeys(BOX), "person_id": None, "is_hard": False})
    path_of = {img["image_id"]: img["path"] for img in images}
    queries = [
        {
            "image": path_of[q["image_id"]],
            **{k: q[k] for k in BOX},
            "person_id": names[q["person_id"]],
            "occluded": q["occluded"],
            "low_resolution": q["low_resolution"],
        }
        for q in m.queries.to_pylist()
    ]
    return rows, queries


def _write(rows: list[dict], path, fmt: str = "csv") -> None:
    table = pa.Table.from_pylist(rows)
    if fmt == "csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)


@pytest.fixture(scope="module")
def reference(tiny_manifests):
    return read_manifests(tiny_manifests)


@pytest.fixture(scope="module")
def tables(reference, tmp_path_factory):
    base = tmp_path_factory.mktemp("table")
    rows, queries = _rows_from_manifests(reference)
    _write(rows, base / "boxes.csv")
    _write(queries, base / "queries.csv")
    return base, rows, queries


def _named(m, table: str) -> list[dict]:
    """Rows with person ids replaced by person names (the formats number them differently)."""
    names = dict(
        zip(*m.persons.select(["person_id", "person_name"]).to_pydict().values(), strict=True)
    )
    out = []
    for row in getattr(m, table).to_pylist():
        if "person_id" in row:
            row["person_id"] = names.get(row["person_id"])
        out.append(row)
    return out


def test_table_gives_the_cuhk_sysu_manifests(tiny_dataset, reference, tables, tmp_path):
    base, _, _ = tables
    options = TableOptions(base / "boxes.csv", base / "queries.csv", gallery_sizes=(5, 10))
    info = ingest(tiny_dataset, tmp_path / "m", "table", options)
    got = read_manifests(tmp_path / "m")
    assert got.images.equals(reference.images)
    assert _named(got, "boxes") == _named(reference, "boxes")
    assert sorted(_named(got, "persons"), key=str) == sorted(_named(reference, "persons"), key=str)
    assert _named(got, "queries") == _named(reference, "queries")
    assert info["format"] == "table" and info["counts"]["labelled_boxes"] == int(
        (reference.boxes.column("person_id").to_numpy() >= 0).sum()
    )
    for key in ("name", "counts", "content_hash", "annotation_files", "gallery_sizes", "subsets"):
        assert key in info
    assert info["gallery_sizes"] == [-1, 5, 10]
    _check_galleries(got)


def _check_galleries(m) -> None:
    """Each sized gallery: N distinct test images per query, never its own, every image
    holding the person among them with its box; the whole-test-set rows: exactly those."""
    boxes, queries = m.boxes.to_pandas(), m.queries.to_pandas()
    test = set(m.images.filter(pa.compute.equal(m.images["split"], "test"))["image_id"].to_pylist())
    g = m.galleries.to_pandas()
    for size, rows in g.groupby("gallery_size"):
        for q, part in rows.groupby("query_id"):
            query = queries.loc[queries.query_id == q].iloc[0]
            mine = boxes[boxes.person_id == query.person_id]
            holding = set(mine.image_id) - {query.image_id}
            images = part.image_id.tolist()
            assert len(set(images)) == len(images) and query.image_id not in images
            assert set(images) <= test
            with_gt = part.dropna(subset=["gt_x1"])
            assert set(with_gt.image_id) == holding
            for _, r in with_gt.iterrows():
                box = mine[mine.image_id == r.image_id].iloc[0]
                assert (r.gt_x1, r.gt_y1, r.gt_x2, r.gt_y2) == (box.x1, box.y1, box.x2, box.y2)
            assert len(images) == (len(holding) if size == -1 else size)


def test_drawn_queries_xywh_parquet_and_cameras(tiny_dataset, tables, tmp_path):
    base, rows, _ = tables
    xywh = []
    for r in rows:
        r = dict(r)
        if r["x1"] is not None:
            r["x"], r["y"], r["w"], r["h"] = r["x1"], r["y1"], r["x2"] - r["x1"], r["y2"] - r["y1"]
        else:
            r["x"] = r["y"] = r["w"] = r["h"] = None
        for k in BOX:
            del r[k]
        # Two cameras: even and odd image numbers; a frame time per image.
        number = int("".join(ch for ch in r["image"] if ch.isdigit()) or 0)
        r["camera"], r["frame_time"] = f"cam{number % 2}", number / 25.0
        xywh.append(r)
    _write(xywh, tmp_path / "boxes.parquet", "parquet")
    options = TableOptions(
        tmp_path / "boxes.parquet", box_format="xywh", gallery_sizes=(4,), seed=3
    )
    info = ingest(tiny_dataset, tmp_path / "m", "table", options)
    m = read_manifests(tmp_path / "m")
    meta = pq.read_table(tmp_path / "m" / "image_meta.parquet").to_pylist()
    camera = {r["image_id"]: r["camera"] for r in meta}
    assert len(meta) == m.images.num_rows and all(r["frame_time"] is not None for r in meta)
    # The rule: one query per test identity per camera it is seen in (if in >= 2 test images).
    boxes = m.boxes.to_pandas()
    test_ids = [
        p
        for p, s in zip(*m.persons.select(["person_id", "split"]).to_pydict().values(), strict=True)
        if s == "test"
    ]
    expected = []
    for p in test_ids:
        mine = boxes[boxes.person_id == p]
        if mine.image_id.nunique() >= 2:
            expected += [(p, c) for c in sorted({camera[i] for i in mine.image_id})]
    q = m.queries.to_pylist()
    assert [(r["person_id"], camera[r["image_id"]]) for r in q] == expected
    assert info["gallery_sizes"] == [-1, 4] and "seed 3" in info["queries_rule"]
    _check_galleries(m)
    # Seeded: the same table and seed give the same manifests.
    ingest(tiny_dataset, tmp_path / "again", "table", options)
    again = read_manifests(tmp_path / "again")
    assert again.queries.equals(m.queries) and again.galleries.equals(m.galleries)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda r: r[3].update(image="../outside.jpg"),
            "row 4, column image: '../outside.jpg' is not a path inside",
        ),
        (
            lambda r: r[2].update(image="/etc/passwd"),
            "row 3, column image: '/etc/passwd' is not a path inside",
        ),
        (lambda r: r[1].update(x2="wide"), "row 2, column x2: expected a number, got 'wide'"),
        (
            lambda r: r[0].update(split="val"),
            "row 1, column split: 'val' is not one of train, test",
        ),
        (lambda r: r[4].update(y2=r[4]["y1"]), "row 5, column y2: the box has no area"),
        (lambda r: r[5].update(x1=None), "row 6, column x1: empty (give all four box values)"),
        (lambda r: r[0].update(image="Image/SSM/missing.jpg"), "row 1, column image: "),
    ],
)
def test_bad_rows_are_one_line_errors(tiny_dataset, tables, tmp_path, capsys, edit, message):
    _, rows, _ = tables
    rows = [{k: (str(v) if v is not None else None) for k, v in r.items()} for r in rows]
    edit(rows)
    _write(rows, tmp_path / "bad.csv")
    out = tmp_path / "m"
    argv = ["ingest", "--format", "table", "--root", str(tiny_dataset), "--out", str(out)]
    code = main(
        [*argv, "--annotations", str(tmp_path / "bad.csv"), "--set", "tracking.enabled=false"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {tmp_path / 'bad.csv'}: ") and message in err
    assert "\n" not in err and not out.exists()


def test_cli_table_and_wrong_box_format_hint(tiny_dataset, tables, tmp_path, capsys):
    base, _, _ = tables
    out = tmp_path / "m"
    argv = ["ingest", "--format", "table", "--root", str(tiny_dataset), "--out", str(out)]
    argv += ["--annotations", str(base / "boxes.csv")]
    assert main([*argv, "--box-format", "xywh"]) == 2
    assert "use --box-format xyxy" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--queries", str(base / "queries.csv"), "--gallery-sizes", "5"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert read_manifests(out).galleries.column("gallery_size").unique().to_pylist() == [-1, 5]
    assert (
        main(["ingest", "--root", str(tiny_dataset), "--out", str(out), "--box-format", "xywh"])
        == 2
    )
    assert "only for --format table" in capsys.readouterr().err


def test_person_across_splits_and_unknown_query(tiny_dataset, tables, tmp_path, capsys):
    base, rows, queries = tables
    rows = [dict(r) for r in rows]
    train = next(r for r in rows if r["split"] == "train" and r["person_id"])
    test = next(r for r in rows if r["split"] == "test" and r["person_id"])
    test["person_id"] = train["person_id"]
    _write(rows, tmp_path / "cross.csv")
    with pytest.raises(Exception, match="in both train and test images"):
        ingest(tiny_dataset, tmp_path / "m", "table", TableOptions(tmp_path / "cross.csv"))
    bad = [dict(queries[0], person_id="nobody")]
    _write(bad, tmp_path / "q.csv")
    with pytest.raises(
        Exception, match=r"q.csv: row 1, column person_id: person nobody has no box"
    ):
        ingest(
            tiny_dataset,
            tmp_path / "m",
            "table",
            TableOptions(base / "boxes.csv", tmp_path / "q.csv"),
        )
    assert not (tmp_path / "m").exists()
