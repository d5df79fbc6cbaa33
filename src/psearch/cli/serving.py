"""`psearch index` and `psearch serve`: argument parsing only; the work is in
psearch.inference.index and psearch.serving.app."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from psearch.cli.common import load_params_from_args
from psearch.errors import PsearchError

DEFAULT_INDEX = "runs/index"
DEFAULT_MODEL = "models:/person-search@champion"


def _index(args) -> int:
    # lazy: faiss and torch take seconds to import; `psearch --help` should not wait for them
    from psearch.inference.index import build_index

    overrides = list(args.overrides)
    if args.kind is not None:
        overrides.append(f"index.kind={args.kind}")
    args.overrides = overrides
    info = build_index(
        Path(args.detections),
        Path(args.out),
        load_params_from_args(args),
        manifests=Path(args.manifests) if args.manifests else None,
        model=args.model,
    )
    print(json.dumps(info, indent=2, default=str))
    return 0


def _serve(args) -> int:
    # lazy: torch, faiss and uvicorn take seconds to import
    import uvicorn

    from psearch.serving.app import create_app
    from psearch.serving.service import SearchService

    if not Path(args.index).is_dir():
        raise PsearchError(f"{args.index}: index not found (build it with psearch index)")
    if not 0 <= args.port <= 65535:
        raise PsearchError(f"--port {args.port}: expected 0..65535")
    params = load_params_from_args(args)
    service = SearchService(Path(args.index), args.model, params, device=args.device)
    service.watch(args.reload_interval)
    snapshot = service.current
    print(
        f"serving {len(snapshot.index)} detections of {len(snapshot.index.images)} images "
        f"with model {snapshot.model_version} ({snapshot.runtime}) "
        f"on http://{args.host}:{args.port}/",
        file=sys.stderr,
    )
    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        service.stop()
    return 0


def add_commands(subparsers, common) -> None:
    p = subparsers.add_parser(
        "index",
        parents=[common],
        help="build the gallery's nearest-neighbour index (faiss) from an extraction",
        description="Reads DETS/gallery_detections.parquet (detections with score >= "
        "index.det_thresh) and writes INDEX/: index.faiss, detections.parquet (image, box, "
        "score per vector), images.parquet and index.json (kind, the model's weights "
        "fingerprint, the data version). Settings: the `index` section of params.yaml "
        "(flat = exact; ivf / hnsw = approximate, for large galleries).",
    )
    p.add_argument("--detections", required=True, metavar="DETS", help="psearch extract output")
    p.add_argument("--out", required=True, metavar="INDEX", help="output directory")
    p.add_argument(
        "--kind",
        choices=["flat", "ivf", "hnsw"],
        default=None,
        help="index kind (overrides index.kind)",
    )
    p.add_argument(
        "--model",
        metavar="MODEL",
        default=None,
        help="the model that made the features, when extraction.json's path has moved",
    )
    p.add_argument(
        "--manifests",
        metavar="DIR",
        default=None,
        help="the extraction's manifests, when extraction.json's path has moved",
    )
    p.set_defaults(func=_index)

    p = subparsers.add_parser(
        "serve",
        parents=[common],
        help="serve the search API and web page over an index (http://127.0.0.1:8000/)",
        description="An HTTP API (POST /search, GET /images/{id}, /crops/{id}, /healthz, "
        "/version, OpenAPI at /docs) and a search page at /, over one index and one model. "
        "A registry alias (models:/NAME@ALIAS) is re-read every --reload-interval seconds "
        "(and on POST /reload); when it moves, or the index is rebuilt, the new model or index "
        "is loaded and swapped in without dropping a request. GET /version names the runtime "
        "that computes query features (pytorch, onnxruntime or torchscript).",
    )
    p.add_argument(
        "--index", default=DEFAULT_INDEX, metavar="INDEX", help=f"default: {DEFAULT_INDEX}"
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="MODEL",
        help="model URI or file; a .onnx file from psearch export runs on onnxruntime (CPU), "
        f"a TorchScript one on torch.jit (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument(
        "--reload-interval",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds between checks of the model alias and the index; 0 = only on POST /reload",
    )
    p.add_argument(
        "--device", default=None, metavar="DEVICE", help="default: extract.device (auto)"
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level",
    )
    p.set_defaults(func=_serve)
