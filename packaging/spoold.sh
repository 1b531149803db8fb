#!/bin/sh
# spoold, from its private virtual environment (Debian package). -I: neither the current
# directory nor PYTHON* variables change which modules the daemon loads.
exec /usr/lib/spoold/venv/bin/python3 -I -m spoold "$@"
