"""`psearch extract`, `extract-merge`, `report` and `search`: running a trained model.

extract and extract-merge run their stages (psearch.stages: torch, imported by the handler);
psearch.inference's report and search modules are light to import (search loads torch only
when it runs a model), so they are imported here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from psearch.cli.common import (
    add_command,
    add_joint_model,
    add_out,
    load_params_from_args,
    print_summary,
)
from psearch.errors import PsearchError
from psearch.inference.report import report
from psearch.inference.search import format_result, parse_box, search
from psearch.inference.shards import parse_shard
from psearch.inference.video import VIDEO_SUFFIXES, frame_ref, query_still

# Frames sampled per second of video by default: people stay in view for seconds.
EVERY_SECONDS = 1.0


def add_commands(subparsers, common: argparse.ArgumentParser) -> None:
    _add_extract(subparsers, common)
    p = add_command(subparsers, common, "extract-merge", _merge)
    add_out(p, "DETS", "output directory")
    p.add_argument(
        "parts", nargs="*", metavar="PART", help="part directories (default: DETS/part-*-of-*)"
    )

    p = add_command(subparsers, common, "report", _report)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output of psearch evaluate")
    add_out(p, "FILE", "write the report here only", required=False)
    _add_search(subparsers, common)


def _add_extract(subparsers, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, common, "extract", _extract)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifests", metavar="DIR", help="output of psearch ingest")
    source.add_argument(
        "--video",
        metavar="FILE_OR_DIR",
        help="instead of --manifests: a video file, or a folder of them; sampled frames "
        "become the gallery (DETS/frames.parquet gives each frame's video and timestamp)",
    )
    add_joint_model(p)
    add_out(p, "DETS", "output directory")
    p.add_argument(
        "--shard",
        metavar="I/N",
        default=None,
        help="process every N-th test image (and query image) from the I-th; writes "
        "DETS/part-00I-of-00N/ (skipped when already done); combine with extract-merge",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="B",
        help="images per forward pass (overrides extract.batch_size)",
    )
    p.add_argument(
        "--device",
        default=None,
        metavar="DEVICE",
        help="auto, cpu or cuda[:N] (overrides extract.device)",
    )
    p.add_argument(
        "--boxes",
        choices=["detect", "gt"],
        default="detect",
        help="detect: the model's detections; gt: the annotated boxes as a perfect detector",
    )
    p.add_argument(
        "--features",
        choices=["joint", "idnet"],
        default="joint",
        help="joint: the model's own re-id features; idnet: an IDNet's features of box crops",
    )
    p.add_argument(
        "--idnet",
        metavar="PATH",
        default=None,
        help="IDNet (idnet.pt of psearch pretrain) for --features idnet",
    )
    sampling = p.add_mutually_exclusive_group()
    sampling.add_argument(
        "--every-seconds",
        type=float,
        default=None,
        metavar="S",
        help=f"with --video: one frame every S seconds of video (default {EVERY_SECONDS:g})",
    )
    sampling.add_argument(
        "--every-frames",
        type=int,
        default=None,
        metavar="N",
        help="with --video: every N-th frame (1 = every frame)",
    )


def _add_search(subparsers, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, common, "search", _search)
    p.add_argument("--model", required=True, metavar="MODEL", help="joint model (as extract)")
    p.add_argument(
        "--query", required=True, metavar="IMAGE", help="image (or video) holding the person"
    )
    p.add_argument(
        "--query-time",
        type=float,
        default=None,
        metavar="SECONDS",
        help="--query is a video: take the person from its frame at this time (--box is in "
        "that frame's pixels)",
    )
    p.add_argument("--box", required=True, metavar="X,Y,W,H", help="the person's box, pixels")
    p.add_argument(
        "--gallery",
        default=None,
        metavar="GALLERY",
        help="a folder of images, or an extraction directory (psearch extract)",
    )
    p.add_argument(
        "--index",
        metavar="INDEX",
        default=None,
        help="instead of --gallery: a gallery index (psearch index); faster on large galleries",
    )
    p.add_argument("--top-k", type=int, default=10, metavar="K", help="matches to show")
    add_out(
        p,
        "PNG_OR_CLIP",
        "picture of the query and matches (.png); over a video gallery also a clip of the "
        "matched frames in time order (.mp4, .mov, .mkv, .avi)",
        required=False,
    )
    p.add_argument(
        "--format",
        choices=["text", "json", "csv"],
        default="text",
        help="how to print the matches (json and csv carry video, frame and time_s for "
        "video galleries)",
    )
    p.add_argument(
        "--det-thresh",
        type=float,
        default=None,
        metavar="S",
        help="minimum detection score (default: evaluate.det_thresh)",
    )
    p.add_argument(
        "--manifests",
        metavar="DIR",
        default=None,
        help="where the extraction's images are listed, when extraction.json's "
        "manifests path has moved",
    )
    p.add_argument(
        "--cbgm",
        action="store_true",
        help="re-rank with the other people of the query and gallery images (SeqNet's CBGM)",
    )


def _extract(args: argparse.Namespace) -> int:
    """detect persons in every test image and compute re-id features (DETS/*.parquet)

    One forward pass per test image gives its boxes, scores and re-id features
    (DETS/gallery_detections.parquet); each query's feature comes from its given box
    (DETS/query_features.parquet); DETS/extraction.json records the settings and throughput.
    --boxes gt and --features idnet give the paper's baselines. With --video instead of
    --manifests, frames sampled from the footage (--every-seconds S, default 1, or
    --every-frames N) are the gallery: DETS/gallery_detections.parquet as above and
    DETS/frames.parquet (each frame's video, frame index and time); no queries. Settings: the
    `extract` and `model` sections of params.yaml.
    """
    # --batch-size and --device are --set shorthands: validated like any override.
    flags = {"extract.batch_size": args.batch_size, "extract.device": args.device}
    args.overrides = [*args.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    params = load_params_from_args(args)
    # lazy: importing torch takes ~2 s; --help and light commands must not pay it
    from psearch import stages

    if args.video is not None:
        info = stages.extract_video(
            Path(args.video), args.model, Path(args.out), params, **_sampling(args)
        )
        print_summary(info)
        return 0
    if args.every_seconds is not None or args.every_frames is not None:
        raise PsearchError("--every-seconds / --every-frames: only used with --video")
    options = {
        "shard": parse_shard(args.shard) if args.shard else None,
        "boxes": args.boxes,
        "features": args.features,
        "idnet": Path(args.idnet) if args.idnet else None,
    }
    info = stages.extract(Path(args.manifests), args.model, Path(args.out), params, **options)
    if info.get("skipped"):
        print(f"{info['out']}: already extracted with these settings, skipped", file=sys.stderr)
    print_summary(info)
    return 0


def _sampling(args: argparse.Namespace) -> dict[str, float | int | None]:
    """The --video options: which frames to sample (default one every EVERY_SECONDS)."""
    for flag, value in (("--shard", args.shard), ("--idnet", args.idnet)):
        if value is not None:
            raise PsearchError(f"{flag}: not available with --video")
    if args.boxes != "detect" or args.features != "joint":
        raise PsearchError("--video: runs the joint model's detections and features only")
    if args.every_frames is not None:
        return {"every_frames": args.every_frames}
    return {"every_seconds": EVERY_SECONDS if args.every_seconds is None else args.every_seconds}


def _merge(args: argparse.Namespace) -> int:
    """combine extraction shards into DETS/gallery_detections.parquet etc.

    Checks that the parts are exactly shards 0..N-1 of one extraction (refuses gaps, overlaps
    and parts made with other settings), then writes the contract files into DETS in
    image_id order. The parts are kept.
    """
    # lazy: importing torch takes ~2 s; --help and light commands must not pay it
    from psearch import stages

    print_summary(stages.extract_merge([Path(p) for p in args.parts], Path(args.out)))
    return 0


def _report(args: argparse.Namespace) -> int:
    """the paper's Table 2 (detector x re-id features) from evaluation directories

    Reads metrics.json and extraction.json of each evaluation directory and prints a Markdown
    table: rows the detector (Deep = the model's detections, GT = annotated boxes), columns
    the re-id features (joint, IDNet), cells mAP / top-1 on gallery 100 (or the first
    protocol present). Writes report.md into each directory, or to --out.
    """
    print(report([Path(d) for d in args.run_dirs], Path(args.out) if args.out else None), end="")
    return 0


def _search(args: argparse.Namespace) -> int:
    """find a query person in a gallery of images; prints matches, draws a PNG

    Computes the query's feature from --box in --query, then ranks every detection in the
    gallery (a folder of images, detected now, or an extraction directory, read from its
    gallery_detections.parquet) by similarity. Each gallery image counts once, by its best
    detection. Over a video extraction (psearch extract --video) each match also gives its
    video, frame index and time, and --out clip.mp4 shows the matched frames as a clip. The query
    can come from footage too: --query VIDEO --query-time SECONDS takes that frame.
    """
    params = load_params_from_args(args)
    query = Path(args.query)
    with tempfile.TemporaryDirectory(prefix="psearch-query-") as scratch:
        if args.query_time is not None or query.suffix.lower() in VIDEO_SUFFIXES:
            query = query_still(query, args.query_time, Path(scratch))
        result = _run_search(args, params, query)
    if query != Path(args.query):  # a frame of a video: say which
        result["query"] = frame_ref(args.query, args.query_time)
    print(format_result(result, args.format), end="")
    return 0


def _run_search(args: argparse.Namespace, params, query: Path) -> dict:
    return search(
        model=args.model,
        query=query,
        box=parse_box(args.box),
        gallery=Path(args.gallery) if args.gallery else None,
        params=params,
        top_k=args.top_k,
        out=Path(args.out) if args.out else None,
        det_thresh=args.det_thresh,
        manifests=Path(args.manifests) if args.manifests else None,
        index=Path(args.index) if args.index else None,
        cbgm=args.cbgm,
    )
