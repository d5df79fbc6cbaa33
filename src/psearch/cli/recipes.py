"""`psearch config list | use | show`: the named recipes in configs/ (the papers' settings).

A recipe is a complete params file (configs/NAME.yaml). `use` validates one and writes it,
comments and all, over params.yaml, which is what `dvc repro` and `dvc exp run -S` read; the
other runners take the file directly (`--params configs/NAME.yaml`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from psearch.atomic import atomic_file
from psearch.config import DEFAULT_PARAMS_FILE, Params, flatten, load_params
from psearch.errors import PsearchError

RECIPES_DIR = Path("configs")


def add_commands(subparsers, common: argparse.ArgumentParser) -> None:
    # No `common` parent: --params/--set make no sense for choosing the params file itself.
    p = subparsers.add_parser(
        "config",
        help="the named recipes (configs/): list them, write one to params.yaml, show one",
        description="The named training recipes in configs/ (docs/training.md, "
        "'Reproducing the paper'): complete params files for real data on a GPU.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="the recipes and what each one is")
    use = actions.add_parser("use", help="validate a recipe and write it to params.yaml")
    use.add_argument("recipe", metavar="NAME", help="a recipe name (configs/NAME.yaml) or a file")
    use.add_argument(
        "--to", default=DEFAULT_PARAMS_FILE, metavar="FILE", help="where to write (params.yaml)"
    )
    show = actions.add_parser("show", help="the values a recipe changes from the defaults")
    show.add_argument("recipe", metavar="NAME", help="a recipe name (configs/NAME.yaml) or a file")
    for parser, run in ((listing, _list), (use, _use), (show, _show)):
        parser.add_argument("--dir", default=str(RECIPES_DIR), help="recipes directory")
        parser.add_argument("--debug", action="store_true", help="show tracebacks")
        parser.set_defaults(func=run)


def recipe_path(name: str, directory: Path = RECIPES_DIR) -> Path:
    """configs/NAME.yaml for a name, or NAME itself when it is a file."""
    if Path(name).is_file():
        return Path(name)
    path = Path(directory) / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(Path(directory).glob("*.yaml"))) or "none"
        raise PsearchError(f"{name}: no such recipe in {directory}/ (known: {known})")
    return path


def summary_line(path: Path) -> str:
    """A recipe's first comment line, without its name: what it is."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("# ").strip()
            return text.split(": ", 1)[1] if ": " in text else text
    return ""


def changed_values(path: Path) -> dict[str, object]:
    """{dotted key: value} wherever the recipe differs from the built-in defaults."""
    defaults, recipe = flatten(Params()), flatten(load_params(path))
    return {key: value for key, value in recipe.items() if defaults.get(key) != value}


def _list(args: argparse.Namespace) -> int:
    """list the recipes"""
    paths = sorted(Path(args.dir).glob("*.yaml"))
    if not paths:
        raise PsearchError(f"{args.dir}: no recipes (*.yaml) here; run from the project root")
    for path in paths:
        print(f"{path.stem:24s} {summary_line(path)}")
    return 0


def _use(args: argparse.Namespace) -> int:
    """write a recipe to params.yaml"""
    path = recipe_path(args.recipe, Path(args.dir))
    params = load_params(path)  # a recipe that does not validate is never written
    target = Path(args.to)
    try:  # what changes, when the file being replaced is itself a valid params file
        before = flatten(load_params(target)) if target.is_file() else {}
    except PsearchError:
        before = {}
    after = flatten(params)
    with atomic_file(target) as tmp:
        tmp.write_text(path.read_text())
    changed = sorted(key for key, value in after.items() if before.get(key) != value)
    summary = {
        "recipe": path.stem,
        "written": str(target),
        "changed": len(changed),
        "pretrain": "yes" if params.pretrain.enabled else "skipped (the recipe has none)",
    }
    print(json.dumps(summary, indent=2), file=sys.stdout)
    return 0


def _show(args: argparse.Namespace) -> int:
    """print the values a recipe sets apart from the defaults"""
    path = recipe_path(args.recipe, Path(args.dir))
    for key, value in changed_values(path).items():
        print(f"{key} = {json.dumps(value)}")
    return 0
