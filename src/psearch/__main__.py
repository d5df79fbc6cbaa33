import sys

from psearch.cli import main

sys.exit(main())
