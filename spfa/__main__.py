"""``python -m spfa``: the command line (:mod:`spfa.cli`)."""

import sys

from .cli import main

sys.exit(main())
