"""``python -m ressl``: the same command line as ``ressl``."""

import sys

from ressl.cli import main

sys.exit(main())
