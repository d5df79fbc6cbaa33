"""`psearch report`: the paper's Table 2 from evaluation directories.

Each directory holds metrics.json (psearch evaluate) and extraction.json (copied there by
evaluate from the detections it scored), which says which boxes ("detect" = Deep, "gt") and
which re-id features ("joint", "idnet") the run used. The table puts detectors in rows and
re-id features in columns, each cell "mAP / top-1" in percent, on gallery 100 (or the first
gallery protocol a run has, named in its cell when it differs from the header's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psearch.atomic import write_text_atomic
from psearch.errors import PsearchError
from psearch.jsonfile import read_json_object

PREFERRED_PROTOCOL = "gallery_100"
REPORT_FILE = "report.md"
DETECTORS = {"detect": "Deep", "gt": "GT"}
REID = {"joint": "Joint (ours)", "idnet": "IDNet"}


@dataclass(frozen=True)
class Run:
    directory: Path
    boxes: str
    features: str
    model: str
    protocol: str
    search: dict[str, Any]
    detection: dict[str, Any]


def read_run(directory: Path) -> Run:
    directory = Path(directory)
    if not directory.is_dir():
        raise PsearchError(f"{directory}: evaluation directory not found")
    metrics = read_json_object(directory / "metrics.json")
    extraction = read_json_object(directory / "extraction.json")
    search = metrics.get("search")
    if not isinstance(search, dict):
        raise PsearchError(f"{directory / 'metrics.json'}: no 'search' section")
    protocols = [name for name in search if name.startswith("gallery_")]
    if not protocols:
        raise PsearchError(f"{directory / 'metrics.json'}: no gallery protocol in 'search'")
    protocol = PREFERRED_PROTOCOL if PREFERRED_PROTOCOL in protocols else protocols[0]
    scores = search[protocol]
    for key in ("mAP", "top1"):
        if not isinstance(scores, dict) or not isinstance(scores.get(key), (int, float)):
            raise PsearchError(f"{directory / 'metrics.json'}: search.{protocol}.{key} missing")
    boxes, features = extraction.get("boxes"), extraction.get("features")
    if boxes not in DETECTORS or features not in REID:
        raise PsearchError(
            f"{directory / 'extraction.json'}: boxes {boxes!r} / features {features!r} "
            f"(expected boxes in {list(DETECTORS)}, features in {list(REID)})"
        )
    return Run(
        directory=directory,
        boxes=boxes,
        features=features,
        model=str(extraction.get("model", "?")),
        protocol=protocol,
        search=scores,
        detection=metrics.get("detection") or {},
    )


def _percent(value: Any) -> str:
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) else "–"


def render(runs: list[Run]) -> str:
    """The Markdown report: Table 2, then one line per run with its details."""
    header_protocol = runs[0].protocol
    cells: dict[tuple[str, str], Run] = {}
    for run in runs:
        key = (run.boxes, run.features)
        if key in cells:
            raise PsearchError(
                f"{run.directory} and {cells[key].directory} are both "
                f"{DETECTORS[run.boxes]} + {REID[run.features]}: give one run per cell"
            )
        cells[key] = run
    lines = [
        f"### Person search: detector × re-id features ({header_protocol}, mAP / top-1 %)",
        "",
        "| Detector | " + " | ".join(REID.values()) + " |",
        "| --- |" + " --- |" * len(REID),
    ]
    for boxes, detector in DETECTORS.items():
        row = []
        for features in REID:
            run = cells.get((boxes, features))
            if run is None:
                row.append("–")
                continue
            cell = f"{_percent(run.search['mAP'])} / {_percent(run.search['top1'])}"
            if run.protocol != header_protocol:
                cell += f" ({run.protocol})"
            row.append(cell)
        lines.append(f"| {detector} | " + " | ".join(row) + " |")
    lines += [
        "",
        "| run | detector | re-id | model | protocol | mAP | top-1 | top-5 | top-10 | det AP "
        "| det recall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        values = [run.search.get(k) for k in ("mAP", "top1", "top5", "top10")]
        values += [run.detection.get("ap"), run.detection.get("recall")]
        lines.append(
            f"| {run.directory} | {DETECTORS[run.boxes]} | {REID[run.features]} | {run.model} "
            f"| {run.protocol} | " + " | ".join(_percent(v) for v in values) + " |"
        )
    return "\n".join(lines) + "\n"


def report(run_dirs: list[Path], out: Path | None = None) -> str:
    """Render the report; write it to `out`, or to report.md in each run directory."""
    if not run_dirs:
        raise PsearchError("report: give at least one evaluation directory")
    text = render([read_run(Path(d)) for d in run_dirs])
    targets = [Path(out)] if out else [Path(d) / REPORT_FILE for d in run_dirs]
    for target in targets:
        write_text_atomic(target, text)
    return text
