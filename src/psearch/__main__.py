"""`python -m psearch ...`: the psearch command (psearch.cli)."""

import sys

from psearch.cli import main

sys.exit(main())
