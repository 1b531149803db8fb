"""Where the vendors' API descriptions are: ``../shared/apis/`` beside the checkout, read in place.

They are not the project's to copy (see their SOURCES.md). A fresh clone elsewhere finds them
through ``SPOOLD_API_DESCRIPTIONS``, a ``shared/apis`` beside any parent directory, or the
machine's ``/work/shared/apis``.
"""

from __future__ import annotations

import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent.parent


def api_description(name: str) -> Path:
    """The path of one API description; FileNotFoundError says where it was looked for."""
    places = []
    if os.environ.get("SPOOLD_API_DESCRIPTIONS"):
        places.append(Path(os.environ["SPOOLD_API_DESCRIPTIONS"]))
    places += [parent / "shared" / "apis" for parent in _HERE.parents]
    places.append(Path("/work/shared/apis"))
    for place in places:
        if (place / name).is_file():
            return place / name
    raise FileNotFoundError(
        f"{name} is in none of {', '.join(map(str, places))}; set SPOOLD_API_DESCRIPTIONS"
    )
