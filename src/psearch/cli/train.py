"""`psearch pretrain` and `psearch train`: IDNet pretraining and joint training."""

from __future__ import annotations

import argparse
from pathlib import Path

from psearch.cli.common import (
    add_command,
    add_manifests,
    add_out,
    load_params_from_args,
    print_summary,
)

RESUME_HELP = (
    "continue from the newest checkpoint in OUT.ckpt/ when it was made with the same "
    "settings (else start fresh); without one, start fresh"
)


def add_commands(subparsers, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, common, "pretrain", _pretrain)
    _add_training_options(p, "output directory (idnet.pt, run.json)")
    p = add_command(subparsers, common, "train", _train)
    _add_training_options(
        p,
        "output directory (model.pt, run.json)",
        init="IDNet weights to start from: OUT/idnet.pt of psearch pretrain, or that directory",
    )


def _add_training_options(p: argparse.ArgumentParser, out_help: str, init: str = "") -> None:
    """--manifests, --out, then (train only) --init, then --resume."""
    add_manifests(p)
    add_out(p, "DIR", out_help)
    if init:
        p.add_argument("--init", metavar="IDNET", default=None, help=init)
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)


def _pretrain(args: argparse.Namespace) -> int:
    """pretrain IDNet on cropped persons and background boxes (writes OUT/idnet.pt)

    Train IDNet (trunk + fc6/fc7/fc8 + identity classifier) on every labelled training box
    and as many random background boxes; its weights initialise `psearch train`. Settings:
    the `pretrain` and `model` sections of params.yaml. Run under `torchrun --nproc_per_node
    N` for data-parallel training.
    """
    params = load_params_from_args(args)
    # lazy: importing torch takes ~2 s; --help and light commands must not pay it
    from psearch import stages

    print_summary(stages.pretrain(Path(args.manifests), Path(args.out), params, resume=args.resume))
    return 0


def _train(args: argparse.Namespace) -> int:
    """train the joint detection + re-id network (writes OUT/model.pt, logs it to MLflow)

    Joint training of the detector and the identity features on scene images. Settings: the
    `train` and `model` sections of params.yaml. Start from an IDNet with --init (the paper:
    a generic start does not converge well with sparse labels). Run under `torchrun
    --nproc_per_node N` for data-parallel training.
    """
    params = load_params_from_args(args)
    # lazy: importing torch takes ~2 s; --help and light commands must not pay it
    from psearch import stages

    init = Path(args.init) if args.init else None
    info = stages.train(Path(args.manifests), Path(args.out), params, init=init, resume=args.resume)
    print_summary(info)
    return 0
