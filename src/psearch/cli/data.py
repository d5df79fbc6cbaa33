"""`psearch synth` and `psearch ingest`: write a synthetic dataset; read a raw one into manifests."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from psearch.cli.common import PRESETS, add_command, add_out, load_params_from_args, with_flags
from psearch.errors import PsearchError


def add_commands(subparsers, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, common, "synth", _synth)
    add_out(p, "ROOT", "dataset root to write", type=Path)
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="size (default: data.preset)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: data.seed)")

    p = add_command(subparsers, common, "ingest", _ingest)
    p.add_argument(
        "--format",
        dest="fmt",
        choices=["cuhk-sysu", "prw", "table"],
        default=None,
        help="layout (default: ingest.format); table: a CSV/Parquet of boxes (--annotations)",
    )
    _add_table_options(p)
    p.add_argument("--root", required=True, type=Path, help="dataset root directory")
    add_out(p, "MANIFESTS", "manifests directory to write", type=Path)


def _synth(args: argparse.Namespace) -> int:
    """write a synthetic dataset in the CUHK-SYSU layout

    Write a synthetic person-search dataset in the exact CUHK-SYSU on-disk layout
    (Image/SSM/*.jpg, annotation/*.mat). Defaults come from the params `data` section.
    """
    cfg = with_flags(load_params_from_args(args).data, preset=args.preset, seed=args.seed)
    # lazy: importing torch takes ~2 s; --help and light commands must not pay it
    from psearch import stages

    s = stages.synth(args.out, cfg)
    print(
        f"wrote {args.out}: {s['images']} images ({s['train_images']} train, {s['test_images']} test), "
        f"{s['boxes']} boxes, {s['train_identities']} + {s['test_identities']} identities, "
        f"{s['queries']} queries, galleries {', '.join(map(str, s['gallery_sizes']))} "
        f"[preset {s['preset']}, seed {s['seed']}]"
    )
    return 0


def _ingest(args: argparse.Namespace) -> int:
    """read a raw CUHK-SYSU or PRW dataset, or a table of boxes, into Parquet manifests

    Read a raw dataset (CUHK-SYSU or PRW layout, or a CSV/Parquet table of boxes) and write the manifests directory (images,
    boxes, persons, queries, galleries .parquet + dataset.json).
    """
    cfg = _table_options(args, with_flags(load_params_from_args(args).ingest, format=args.fmt))
    # lazy: importing torch takes ~2 s; --help and light commands must not pay it
    from psearch import stages

    info = stages.ingest(args.root, args.out, cfg)
    c = info["counts"]
    sizes = ", ".join("all" if g == -1 else str(g) for g in info["gallery_sizes"])
    print(
        f"wrote {args.out}: {c['images']} images, {c['boxes']} boxes ({c['labelled_boxes']} labelled, "
        f"{c['dropped_zero_size_boxes']} zero-size dropped), {c['persons']} persons, "
        f"{c['queries']} queries, galleries {sizes} [{info['name']}, {info['content_hash'][:19]}]"
    )
    return 0


# --- format table (issue 17): options that fill the ingest section's table fields ---


def _add_table_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--annotations",
        metavar="FILE",
        default=None,
        help="format table: CSV or Parquet, one row per box (default: ingest.annotations)",
    )
    p.add_argument(
        "--queries",
        metavar="FILE",
        default=None,
        help="format table: a table of query boxes (default: ingest.queries, else one query "
        "drawn per test identity per camera)",
    )
    p.add_argument(
        "--box-format",
        choices=["xyxy", "xywh"],
        default=None,
        help="format table: columns x1,y1,x2,y2 or x,y,w,h (default: ingest.box_format)",
    )
    p.add_argument(
        "--gallery-sizes",
        metavar="N,N,...",
        default=None,
        help="format table: gallery sizes besides the whole test set (default: "
        "ingest.gallery_sizes)",
    )


def _table_options(args: argparse.Namespace, cfg):
    changes = {}
    if args.annotations is not None:
        changes["annotations"] = str(args.annotations)
    if args.queries is not None:
        changes["queries"] = str(args.queries)
    if args.box_format is not None:
        changes["box_format"] = args.box_format
    if args.gallery_sizes is not None:
        try:
            changes["gallery_sizes"] = [int(v) for v in args.gallery_sizes.split(",") if v.strip()]
        except ValueError:
            raise PsearchError(
                f"--gallery-sizes {args.gallery_sizes!r}: expected sizes like 50,100"
            ) from None
    if changes and cfg.format != "table":
        raise PsearchError(f"--{next(iter(changes)).replace('_', '-')}: only for --format table")
    return dataclasses.replace(cfg, **changes)
