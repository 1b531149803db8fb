"""``python -m spoold``."""

import sys

from spoold.app import main

sys.exit(main())
