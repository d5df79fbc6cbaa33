"""`psearch pretrain` and `psearch train` (argument parsing only; the work is in stages)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESUME_HELP = (
    "continue from the newest checkpoint in OUT.ckpt/ when it was made with the same "
    "settings (else start fresh); without one, start fresh"
)


def _pretrain(args) -> int:
    from psearch import stages
    from psearch.cli import load_params_from_args

    params = load_params_from_args(args)
    info = stages.pretrain(Path(args.manifests), Path(args.out), params, resume=args.resume)
    _print_summary(info)
    return 0


def _train(args) -> int:
    from psearch import stages
    from psearch.cli import load_params_from_args

    params = load_params_from_args(args)
    init = Path(args.init) if args.init else None
    info = stages.train(Path(args.manifests), Path(args.out), params, init=init, resume=args.resume)
    _print_summary(info)
    return 0


def _print_summary(info: dict) -> None:
    if info:  # empty on non-zero ranks under torchrun
        print(json.dumps(info, indent=2), file=sys.stdout)


def add_commands(subparsers, common) -> None:
    p = subparsers.add_parser(
        "pretrain",
        parents=[common],
        help="pretrain IDNet on cropped persons and background boxes (writes OUT/idnet.pt)",
        description="Train IDNet (trunk + fc6/fc7/fc8 + identity classifier) on every labelled "
        "training box and as many random background boxes; its weights initialise `psearch "
        "train`. Settings: the `pretrain` and `model` sections of params.yaml. Run under "
        "`torchrun --nproc_per_node N` for data-parallel training.",
    )
    p.add_argument("--manifests", required=True, metavar="DIR", help="output of psearch ingest")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output directory (idnet.pt, run.json)"
    )
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    p.set_defaults(func=_pretrain)

    p = subparsers.add_parser(
        "train",
        parents=[common],
        help="train the joint detection + re-id network (writes OUT/model.pt, logs it to MLflow)",
        description="Joint training of the detector and the identity features on scene images. "
        "Settings: the `train` and `model` sections of params.yaml. Start from an IDNet with "
        "--init (the paper: a generic start does not converge well with sparse labels). Run "
        "under `torchrun --nproc_per_node N` for data-parallel training.",
    )
    p.add_argument("--manifests", required=True, metavar="DIR", help="output of psearch ingest")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output directory (model.pt, run.json)"
    )
    p.add_argument(
        "--init",
        metavar="IDNET",
        default=None,
        help="IDNet weights to start from: OUT/idnet.pt of psearch pretrain, or that directory",
    )
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    p.set_defaults(func=_train)
