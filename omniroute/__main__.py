"""``python -m omniroute``: the same command line as ``omniroute``."""

import sys

from omniroute.cli import main

sys.exit(main())
