"""`python -m psearch.cli ...` (torchrun's `-m psearch.cli train ...`): the psearch command."""

import sys

from psearch.cli import main

sys.exit(main())
