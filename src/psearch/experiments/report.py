"""`psearch paper`'s report directory: report.md (Table 2, Table 3, Fig. 6, Fig. 7(b), the
paper's orderings checked on our data, the steps and their times), results.json (everything
the report shows, as numbers) and the figures' PNGs beside them. The paper's published
numbers stand beside ours, labelled as the paper's (published.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from psearch.atomic import write_text_atomic
from psearch.experiments import published
from psearch.experiments.figures import (
    FIG6_FILE,
    FIG7B_FILE,
    PREFERRED,
    draw_fig6,
    draw_fig7b,
    gallery_points,
    protocol_of,
)

REPORT_FILE = "report.md"
RESULTS_FILE = "results.json"
NAMES = {
    "joint": "Joint net (ours, end-to-end)",
    "joint_gt": "GT boxes + joint features",
    "deep_idnet": "Deep + IDNet (two-stage)",
    "gt_idnet": "GT boxes + IDNet",
    "softmax": "Joint net, plain softmax",
}
SUBSETS = (
    ("whole", "Whole test set"),
    ("occlusion", "Occlusion"),
    ("low_resolution", "Low resolution"),
)


def write_report(results: dict[str, Any], out: Path) -> Path:
    """Write results.json, the PNGs and report.md into `out`; return report.md's path."""
    out = Path(out)
    legs = results["legs"]
    main = legs["main"]
    write_text_atomic(out / RESULTS_FILE, json.dumps(results, indent=2, default=str) + "\n")
    draw_fig6(legs, out / FIG6_FILE)
    curves = {
        label: (NAMES[label], main["runs"][label]["metrics"])
        for label in ("joint", "deep_idnet", "gt_idnet", "joint_gt")
        if label in main["runs"]
    }
    draw_fig7b(curves, out / FIG7B_FILE)
    path = out / REPORT_FILE
    write_text_atomic(path, render(results))
    return path


# ------------------------------------------------------------------------------ helpers


def _scores(run: dict[str, Any] | None, protocol: str) -> dict[str, Any] | None:
    if run is None:
        return None
    return run["metrics"].get("search", {}).get(protocol)


def _cell(scores: dict[str, Any] | None) -> str:
    if not scores:
        return "–"
    return f"{100 * scores['mAP']:.1f} / {100 * scores['top1']:.1f}"


def _paper(pair: tuple[float, float] | None) -> str:
    return f"{pair[0]:.1f} / {pair[1]:.1f}" if pair else "–"


def _map(run: dict[str, Any] | None, protocol: str) -> float | None:
    scores = _scores(run, protocol)
    return None if scores is None else 100 * scores["mAP"]


def _verdict(holds: bool | None, tie: bool = False) -> str:
    """The verdict on an ordering; `tie`: it holds only because the values are equal."""
    if holds and tie:
        return "**holds** (only as a tie)"
    return {True: "**holds**", False: "**does not hold**", None: "**cannot tell**"}[holds]


def _tied(*values: float | None) -> bool:
    """Equal as printed (to 0.1 point)."""
    shown = {f"{v:.1f}" for v in values if v is not None}
    return len(shown) == 1


# ------------------------------------------------------------------------------ sections


def render(results: dict[str, Any]) -> str:
    legs = results["legs"]
    main = legs["main"]
    runs = main["runs"]
    protocol = protocol_of(runs["joint"]["metrics"])
    lines = [
        "# The paper's experiments on our data",
        "",
        f"Written by `psearch paper`. Ours: {main['dataset']}, {main['train_identities']} training "
        f"identities, {_queries(runs['joint'], protocol)} queries; mAP / top-1 in percent on "
        f"`{protocol}` unless a table says otherwise. Columns marked *(paper)* are the "
        f"published numbers of {published.CITATION}: real photographs and a VGG16 trunk, so "
        "they are a reference for the shape of the results, not a target for the numbers.",
        "",
    ]
    if results.get("mlflow_parent_run"):
        lines += [
            f"MLflow: every run is a child of parent run `{results['mlflow_parent_run']}`.",
            "",
        ]
    lines += _table2(runs, protocol, main["dataset"])
    lines += _table3(runs)
    lines += _fig6(legs)
    lines += _fig7b(runs)
    lines += _orderings(legs, protocol)
    lines += _steps(results["steps"])
    return "\n".join(lines) + "\n"


def _queries(run: dict[str, Any], protocol: str) -> str:
    scores = _scores(run, protocol) or {}
    return str(scores.get("queries", "?"))


def _table2(runs: dict[str, Any], protocol: str, dataset: str) -> list[str]:
    t2 = published.TABLE2
    rows = [
        (
            "Deep (separately trained detector)",
            runs.get("deep_idnet"),
            None,
            t2[("Deep", "IDNet")],
            None,
        ),
        ("Joint net's own detections", None, runs.get("joint"), None, t2[("Ours", "Ours")]),
        ("GT boxes", runs.get("gt_idnet"), runs.get("joint_gt"), t2[("GT", "IDNet")], None),
    ]
    lines = [
        f"## Table 2: detector × re-id features ({protocol}, mAP / top-1 %)",
        "",
        "| Detector | IDNet | Joint (ours) | IDNet *(paper)* | Ours *(paper)* |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, idnet, joint, paper_idnet, paper_ours in rows:
        cells = [_cell(_scores(idnet, protocol)), _cell(_scores(joint, protocol))]
        lines.append(
            f"| {name} | " + " | ".join([*cells, _paper(paper_idnet), _paper(paper_ours)]) + " |"
        )
    lines += [
        "",
        "The Deep detector is the joint net trained with its identity loss switched off "
        "(`train.loss.reid_loss: none`), from the same IDNet start; IDNet's features of its "
        "boxes make the two-stage row, as the paper's Deep + IDNet. The paper's other "
        f"two-stage baselines (ACF, hand-crafted features) have no counterpart here; e.g. "
        f"Deep + KISSME *(paper)* {_paper(t2[('Deep', 'KISSME')])}, GT + BoW *(paper)* "
        f"{_paper(t2[('GT', 'BoW')])}.",
        "",
    ]
    reranked = [label for label in runs if label.endswith("+cbgm")]
    if reranked:
        lines += [
            f"With CBGM re-ranking (context bipartite graph matching, SeqNet's; {protocol}):",
            "",
            "| run | without | with CBGM | mAP change |",
            "| --- | --- | --- | --- |",
        ]
        for label in reranked:
            base = label.removesuffix("+cbgm")
            before, after = _map(runs.get(base), protocol), _map(runs[label], protocol)
            change = f"{after - before:+.1f}" if before is not None and after is not None else "–"
            lines.append(
                f"| {NAMES[base]} | {_cell(_scores(runs.get(base), protocol))} "
                f"| {_cell(_scores(runs[label], protocol))} | {change} |"
            )
        lines += ["", _cbgm_note(dataset), ""]
    lines += [
        "Detectors (detection AP / recall at IoU 0.5 over the test images, %):",
        "",
        "| detector | AP | recall |",
        "| --- | --- | --- |",
    ]
    for label, name in (("deep_idnet", "Deep (detector only)"), ("joint", "Joint net")):
        det = runs.get(label, {}).get("metrics", {}).get("detection", {})
        ap, recall = det.get("ap"), det.get("recall")
        if isinstance(ap, (int, float)) and isinstance(recall, (int, float)):
            lines.append(f"| {name} | {100 * ap:.1f} | {100 * recall:.1f} |")
    return [*lines, ""]


def _cbgm_note(dataset: str) -> str:
    """What CBGM needs of the data, and why the synthetic sets cannot show a gain."""
    note = "CBGM adds the similarities of the query's companions to a candidate's: "
    note += published.SEQNET_CBGM_TEXT + "."
    if dataset.startswith("synthetic"):
        # psearch.synth.plan draws each identity's scenes independently of everyone else's.
        note += (
            " The synthetic generator places each identity in its scenes independently of the "
            "others, so companions never reappear together: every context match is chance, noise "
            "added to the similarity, and CBGM is not expected to help on this data."
        )
    return note


def _subset(run: dict[str, Any] | None, subset: str) -> dict[str, Any] | None:
    if run is None:
        return None
    search = run["metrics"].get("search", {})
    return search.get(PREFERRED) if subset == "whole" else search.get(subset)


def _table3(runs: dict[str, Any]) -> list[str]:
    t3 = published.TABLE3
    lines = [
        f"## Table 3: occlusion and low-resolution subsets ({PREFERRED}, mAP / top-1 %)",
        "",
        "| subset | queries | Joint (ours) | Deep + IDNet (ours) | Ours *(paper)* "
        "| Deep+KISSME *(paper)* | ACF+BoW *(paper)* |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, name in SUBSETS:
        joint = _subset(runs.get("joint"), key)
        queries = joint.get("queries", "–") if joint else "–"
        cells = [_cell(joint), _cell(_subset(runs.get("deep_idnet"), key))]
        cells += [_paper(t3[method][key]) for method in ("Ours", "Deep+KISSME", "ACF+BoW")]
        lines.append(f"| {name} | {queries} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _fig6(legs: dict[str, Any]) -> list[str]:
    lines = [
        "## Fig. 6: random sampling softmax (RSS) vs plain softmax",
        "",
        f"![Fig. 6]({FIG6_FILE})",
        "",
        "| training identities | data | loss | steps | final identity loss | final identity "
        "accuracy | mAP / top-1 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for leg in legs.values():
        for loss, label in (("rss", "joint"), ("softmax", "softmax")):
            run = leg["runs"].get(label)
            training = leg["trainings"].get(loss)
            if run is None or training is None:
                continue
            info = training["run"]
            protocol = protocol_of(run["metrics"])
            values = [info.get("final_loss_reid"), info.get("final_acc_reid")]
            shown = [f"{v:.3f}" if isinstance(v, (int, float)) else "–" for v in values]
            lines.append(
                f"| {leg['train_identities']} | {leg['dataset']} | {loss} | {info.get('steps', '–')} "
                f"| {shown[0]} | {shown[1]} | {_cell(_scores(run, protocol))} ({protocol}) |"
            )
    lines += [
        "",
        "Final values are the last epoch's means. RSS's accuracy is over each sample's K "
        "sampled classes, so it reads higher than the plain softmax's over all C + 1. For "
        f"comparison, {published.FIG6_TEXT}.",
        "",
    ]
    return lines


def _fig7b(runs: dict[str, Any]) -> list[str]:
    labels = [label for label in ("joint", "deep_idnet", "gt_idnet", "joint_gt") if label in runs]
    sizes = sorted({p[0] for label in labels for p in gallery_points(runs[label]["metrics"])})
    lines = [
        "## Fig. 7(b): search accuracy vs gallery size",
        "",
        f"![Fig. 7(b)]({FIG7B_FILE})",
        "",
        "| gallery size | " + " | ".join(NAMES[label] for label in labels) + " |",
        "| --- |" + " --- |" * len(labels),
    ]
    for size in sizes:
        cells = [_cell(_scores(runs[label], f"gallery_{size}")) for label in labels]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return [*lines, "", f"For comparison, {published.FIG7B_TEXT}.", ""]


def _orderings(legs: dict[str, Any], protocol: str) -> list[str]:
    runs = legs["main"]["runs"]
    gt, joint, two_stage = (
        _map(runs.get(k), protocol) for k in ("joint_gt", "joint", "deep_idnet")
    )
    gt_idnet = _map(runs.get("gt_idnet"), protocol)
    first = None if None in (gt, joint, two_stage) else gt >= joint >= two_stage
    lines = ["## The paper's orderings on our data", ""]
    lines.append(
        f"- GT boxes ≥ joint ≥ two-stage (mAP, {protocol}): "
        f"{_verdict(first, _tied(gt, joint) or _tied(joint, two_stage))}: GT boxes + joint "
        f"features {_num(gt)}, joint {_num(joint)}, Deep + IDNet {_num(two_stage)} "
        f"(GT boxes + IDNet {_num(gt_idnet)}; the paper: GT + IDNet 66.5 ≥ ours 55.7 ≥ "
        "Deep + IDNet 52.6)."
    )
    lines.append(_rss_line(legs))
    points = gallery_points(runs["joint"]["metrics"])
    falls = (
        None
        if len(points) < 2
        else all(b[1] <= a[1] for a, b in zip(points, points[1:], strict=False))
    )
    curve = ", ".join(f"{size}: {100 * m:.1f}" for size, m, _ in points)
    lines.append(
        f"- mAP falls as the gallery grows (joint net): "
        f"{_verdict(falls, _tied(*(100 * p[1] for p in points)))}: {curve or 'no sized gallery'}."
    )
    whole, occ, low = (
        _subset(runs.get("joint"), k) for k in ("whole", "occlusion", "low_resolution")
    )
    below = None
    if whole and occ and low and occ.get("queries") and low.get("queries"):
        below = occ["mAP"] < whole["mAP"] and low["mAP"] < whole["mAP"]
    lines.append(
        f"- Occlusion and low resolution below the whole set (joint net, mAP, {PREFERRED}): "
        f"{_verdict(below)}: whole {_num(_pct(whole))}, occlusion {_num(_pct(occ))}, "
        f"low resolution {_num(_pct(low))} (the paper: 55.7, 39.7, 35.7)."
    )
    return [*lines, ""]


def _rss_line(legs: dict[str, Any]) -> str:
    pairs = []
    for leg in legs.values():
        rss, soft = leg["runs"].get("joint"), leg["runs"].get("softmax")
        if rss is None or soft is None:
            continue
        protocol = protocol_of(rss["metrics"])
        pairs.append(
            (leg["train_identities"] or 0, _map(rss, protocol), _map(soft, protocol), protocol)
        )
    if not pairs:
        return "- RSS ≥ softmax at many identities: **cannot tell**: no softmax run."
    most = max(pairs, key=lambda p: p[0])
    holds = None if None in most[1:3] else most[1] >= most[2]
    tie = _tied(most[1], most[2])
    each = "; ".join(
        f"{n} identities: RSS {_num(r)} vs softmax {_num(s)} ({p})" for n, r, s, p in pairs
    )
    return (
        f"- RSS ≥ softmax at many identities (mAP at {most[0]} identities, the most here): "
        f"{_verdict(holds, tie)}: {each} (the paper, 5,532 identities: about 55 vs 40)."
    )


def _pct(scores: dict[str, Any] | None) -> float | None:
    return None if not scores else 100 * scores["mAP"]


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _steps(steps: list[dict[str, Any]]) -> list[str]:
    ran = sum(s["seconds"] for s in steps if not s["cached"])
    lines = [
        "## Steps",
        "",
        f"{len(steps)} steps, {sum(not s['cached'] for s in steps)} run this time "
        f"({ran:.0f} s), the rest finished earlier (their times are from then). Each "
        "directory is the stage's normal output plus step.json.",
        "",
        "| step | directory | this run | seconds |",
        "| --- | --- | --- | --- |",
    ]
    for s in steps:
        state = "cached" if s["cached"] else "ran"
        lines.append(
            f"| {s['step']} | `{Path(s['directory']).name}` | {state} | {s['seconds']:.1f} |"
        )
    return [*lines, ""]
