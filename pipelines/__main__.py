"""`python -m pipelines ACTION ...`: what `psearch pipeline ACTION ...` runs."""

import sys

from pipelines.cli import main

sys.exit(main(prog="psearch pipeline"))
