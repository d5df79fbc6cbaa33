"""`psearch synth` and `psearch ingest`: write a synthetic dataset; read a raw one into manifests."""

from __future__ import annotations

import argparse
from pathlib import Path

from psearch.cli.common import add_command, add_out, load_params_from_args, with_flags


def add_commands(subparsers, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, common, "synth", _synth)
    add_out(p, "ROOT", "dataset root to write", type=Path)
    p.add_argument(
        "--preset",
        choices=["tiny", "demo", "full"],
        default=None,
        help="size (default: data.preset)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: data.seed)")

    p = add_command(subparsers, common, "ingest", _ingest)
    p.add_argument(
        "--format",
        dest="fmt",
        choices=["cuhk-sysu", "prw"],
        default=None,
        help="layout (default: ingest.format)",
    )
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
    """read a raw CUHK-SYSU or PRW dataset into Parquet manifests

    Read a raw dataset (CUHK-SYSU or PRW layout) and write the manifests directory (images,
    boxes, persons, queries, galleries .parquet + dataset.json).
    """
    cfg = with_flags(load_params_from_args(args).ingest, format=args.fmt)
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
