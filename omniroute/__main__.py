"""``python -m omniroute``: the same command line as ``omniroute``."""

import sys

from omniroute.commands.cli import main

sys.exit(main())
