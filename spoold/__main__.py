"""``python -m spoold``."""

import sys

from spoold.cli import main

sys.exit(main())
