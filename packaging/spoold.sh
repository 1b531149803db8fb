#!/bin/sh
# spoold, from its private virtual environment (Debian package). -I: neither the current
# directory nor PYTHON* variables change which modules the daemon loads. spoold.app is called
# directly rather than through -m, which loads runpy (a tenth of a light command's start).
exec /usr/lib/spoold/venv/bin/python3 -I -c 'import sys; from spoold.app import main; sys.exit(main())' "$@"
