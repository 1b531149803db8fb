"""A flood, this spoold against another one (an older commit's), alternating in one run.

Both daemons run at once, 2 workers each, on spools of their own. Each round renames
``--files`` ``/bin/true`` job files into one spool's incoming/ at once and then into the
other's (the order alternates from round to round), measured as ``bench_compare.py``'s flood
row measures spoold (``benchmarks.bench_compare.flood``): how fast they were accepted, and
the peak of RSS and PSS summed over the daemon's processes against just before the drop.

    .venv/bin/python benchmarks/bench_flood.py --against /path/to/old/venv/bin/python

Run it from outside the checkout (cd /tmp): the checkout's spoold/ would shadow the other
one's in its processes. ``--against`` names a Python with the other spoold installed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root is one up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_compare import flood
from benchmarks.bench_spool import (
    Tool,
    make_tool,
    same_interpreter,
    say,
    spread_subdirectories,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, metavar="PYTHON")
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dir", type=Path, help="where the temporary spools go")
    args = parser.parse_args()
    same_interpreter(sys.executable, args.against)
    base = Path(tempfile.mkdtemp(prefix="bench-flood-", dir=args.dir))
    base.chmod(0o711)  # the jobs' user passes through
    tools: dict[str, Tool] = {}
    rows: dict[str, list[dict[str, float]]] = {"this": [], "other": []}
    try:
        spread_subdirectories(base)
        (base / "stage").mkdir()
        (base / "archive").mkdir()
        # make_tool's "floor" column runs the other spoold when given --against.
        tools = {
            "this": make_tool("spoold", base, 2),
            "other": make_tool("floor", base, 2, args.against),
        }
        for tool in tools.values():
            tool.daemon.start()
        for round_ in range(args.rounds):
            for name in ("this", "other") if round_ % 2 == 0 else ("other", "this"):
                ids = [f"r{round_}-{name}-{i:05d}" for i in range(args.files)]
                out = flood(tools[name], ids, base)
                rows[name].append(out)
                say(
                    f"round {round_ + 1} {name}: {out['accepted_per_s']:.0f} files/s, peak RSS "
                    f"{out['peak_rss_mb']:.1f} MiB against {out['rss_before_mb']:.1f} before "
                    f"({out['peak_rss_mb'] / out['rss_before_mb']:.3f}x)"
                )
    finally:
        for tool in tools.values():
            tool.daemon.stop()
        shutil.rmtree(base, ignore_errors=True)
    rates = [
        t["accepted_per_s"] / o["accepted_per_s"]
        for t, o in zip(rows["this"], rows["other"], strict=True)
    ]
    for name, found in rows.items():
        print(
            f"{name}: accepted {statistics.median(r['accepted_per_s'] for r in found):.0f} files/s, "
            f"peak {statistics.median(r['peak_rss_mb'] for r in found):.1f} MiB, "
            f"{statistics.median(r['peak_rss_mb'] / r['rss_before_mb'] for r in found):.3f}x its RSS before"
        )
    print("accepted, this over other, by round: " + ", ".join(f"{r:.2f}" for r in rates))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
