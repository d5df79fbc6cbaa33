"""Property: `psearch ingest --format table` over a mutated annotation table either succeeds
with consistent manifests or fails with exit 2, one `error:` line, and nothing written —
never a traceback or an internal error."""

from __future__ import annotations

import itertools

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ingest_table import _rows_from_manifests

from faults.helpers import run_cli
from psearch.data.manifest import read_manifests
from psearch.data.records import inside_root

COLUMNS = ("image", "x1", "y1", "x2", "y2", "person_id", "split", "is_hard")
NASTY = st.sampled_from(
    ["", "nan", "inf", "-inf", "-1", "0", "1e12", "-1e12", "3.5", "../outside.jpg",
     "/etc/passwd", "Image/SSM/missing.jpg", "Image/SSM", "val", "train", "test", "true",
     "p1", "\x00", "Image/SSM/s1.jpg"]
)  # fmt: skip
MUTATION = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 10_000), st.sampled_from(COLUMNS), NASTY),
    st.tuples(st.just("set"), st.integers(0, 10_000), st.sampled_from(COLUMNS), st.text()),
    st.tuples(st.just("drop_row"), st.integers(0, 10_000), st.none(), st.none()),
    st.tuples(st.just("copy_row"), st.integers(0, 10_000), st.none(), st.none()),
    st.tuples(st.just("drop_column"), st.none(), st.sampled_from(COLUMNS), st.none()),
)


@pytest.fixture(scope="module")
def base_rows(tiny_manifests) -> list[dict]:
    rows, _ = _rows_from_manifests(read_manifests(tiny_manifests))
    return [{k: (None if v is None else str(v)) for k, v in row.items()} for row in rows]


def _mutate(rows: list[dict], mutations) -> list[dict]:
    rows = [dict(row) for row in rows]
    for kind, index, column, value in mutations:
        i = (index or 0) % len(rows)
        if kind == "set":
            rows[i][column] = value
        elif kind == "drop_row" and len(rows) > 1:
            del rows[i]
        elif kind == "copy_row":
            rows.insert(i, dict(rows[i]))
        elif kind == "drop_column":
            for row in rows:
                row.pop(column, None)
    return rows


@pytest.mark.slow
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_mutated_tables_ingest_consistently_or_fail_cleanly(
    tiny_dataset, base_rows, tmp_path_factory, capsys, mutations
):
    work = tmp_path_factory.mktemp("mutated")
    rows = _mutate(base_rows, mutations)
    names = list(dict.fromkeys(itertools.chain.from_iterable(rows)))
    table = pa.table({n: pa.array([row.get(n) for row in rows], pa.string()) for n in names})
    pacsv.write_csv(table, work / "boxes.csv")
    out = work / "outs" / "manifests"
    argv = ["ingest", "--format", "table", "--root", str(tiny_dataset), "--out", str(out)]
    code, _, err = run_cli([*argv, "--annotations", str(work / "boxes.csv")], capsys)
    if code == 0:
        m = read_manifests(out)
        paths = m.images.column("path").to_pylist()
        assert all(inside_root(p) == p for p in paths)
        boxes = m.boxes
        assert pc.all(pc.greater(boxes["x2"], boxes["x1"])).as_py() in (True, None)
        assert pc.all(pc.greater(boxes["y2"], boxes["y1"])).as_py() in (True, None)
        known = set(m.images.column("image_id").to_pylist())
        assert set(boxes.column("image_id").to_pylist()) <= known
        assert set(m.queries.column("image_id").to_pylist()) <= known
    else:
        lines = err.strip().splitlines()
        assert code == 2, err
        assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
        assert not (work / "outs").exists() or list((work / "outs").iterdir()) == []
