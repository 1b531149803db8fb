"""How long the light commands of ``spoold`` take, start to exit: ``--version``, ``status ID``
and ``list`` on a small spool, against ``python -I -c pass`` (the interpreter's own start).

Each command runs as the Debian package's ``/usr/bin/spoold`` runs it (``python3 -I``, then
``spoold.app.main``), in three layouts:

- **checkout**: no config file (the spool from ``SPOOLD_SPOOL``), so no YAML is read;
- **package**: a ``config.yaml`` naming the spool, and a runtime directory
  (``XDG_RUNTIME_DIR``) holding its parsed copy, as in a user's login session;
- **package, no runtime dir**: the same config, parsed with PyYAML on every call (root's
  ``sudo -i`` shell, a cron job).

All commands take turns within each round (one run of each, then the next round), so a drift
of the machine's speed touches all alike; the ratio to ``python -c pass`` is taken per round
and its median printed beside the median times (wall and CPU: user + system of the child).
Byte code is compiled once into a temporary PYTHONPYCACHEPREFIX, as the package compiles its
modules at install. Numbers, not asserts.

``--python`` names the interpreter whose spoold is timed. The checkout's ``.venv`` is an
editable install whose ``.pth`` hooks cost every start some 40 ms, ``pass`` included; the
package's venv has none. For the package's numbers, make a venv as the package does::

    python3 -m venv /tmp/pv && /tmp/pv/bin/pip install --require-hashes -r requirements.lock
    /tmp/pv/bin/pip install --no-deps --no-build-isolation .

``--against PYTHON`` runs the same commands with the spoold installed for another interpreter
(a venv made the same way from a ``git worktree`` of an older commit) in the same rounds, and
prints the time of ``--python``'s over that one's, per command::

    .venv/bin/python benchmarks/bench_cli_start.py [--runs 21] [--python /tmp/pv/bin/python]
        [--against /tmp/pv-old/bin/python]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root is one up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_spool import same_interpreter

JOB = "job_id: bench-1\nexecutor: local\nproduct: {commands: 'true'}\n"
ARGUMENTS = {"--version": ["--version"], "status ID": ["status", "bench-1"], "list": ["list"]}


#: What the package's /usr/bin/spoold runs; spoold before issue 17 had its main in spoold.cli.
_MAIN = """import sys
try:
    from spoold.app import main
except ImportError:
    from spoold.cli import main
sys.exit(main())"""


def _spoold(python: str) -> list[str]:
    """``python -I`` calling spoold's main, as the package's /usr/bin/spoold does."""
    return [python, "-I", "-c", _MAIN]


def _timed(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one run; the command must succeed.

    Reaped with a blocking wait4: subprocess's wait with a timeout polls, in steps of up to
    50 ms, which rounds every time up to one. A watchdog timer kills a child that hangs.
    """
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL)
    watchdog = threading.Timer(60, child.kill)
    watchdog.start()
    try:
        _, status, usage = os.wait4(child.pid, 0)
    finally:
        watchdog.cancel()
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, command)
    return wall, usage.ru_utime + usage.ru_stime


def _layouts(top: Path, base: dict[str, str]) -> dict[str, tuple[dict[str, str], Path]]:
    """Each layout's environment and working directory."""
    spool = top / "spool"
    checkout = top / "checkout"
    package = top / "package"
    runtime = top / "run-user"
    for directory in (checkout, package):
        directory.mkdir()
    runtime.mkdir(mode=0o700)
    (package / "config.yaml").write_text(
        f"# as /etc/spoold/config.yaml would be\nspool: {spool}\nworkers: 2\n"
        "limits: {max_log_size: 10MiB}\nretention: {done: {max_age: 30d}}\n"
    )
    plain = {k: v for k, v in base.items() if k not in ("SPOOLD_SPOOL", "XDG_RUNTIME_DIR")}
    return {
        "checkout": ({**plain, "SPOOLD_SPOOL": str(spool)}, checkout),
        "package": ({**plain, "XDG_RUNTIME_DIR": str(runtime)}, package),
        "package, no runtime dir": (plain, package),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=21, help="rounds (medians over them)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to time")
    parser.add_argument("--against", metavar="PYTHON", help="another interpreter's spoold too")
    args = parser.parse_args()
    pythons = {"": args.python}
    if args.against:
        same_interpreter(args.python, args.against)
        pythons["old "] = args.against
    top = Path(tempfile.mkdtemp(prefix="spoold-bench-cli-"))
    try:
        base = {**os.environ, "PYTHONPYCACHEPREFIX": str(top / "pycache")}
        base.pop("PYTHONDONTWRITEBYTECODE", None)
        layouts = _layouts(top, base)
        setup_env, setup_cwd = layouts["checkout"]
        (top / "job.yaml").write_text(JOB)
        for step in (["init"], ["exec", str(top / "job.yaml")]):
            subprocess.run([*_spoold(args.python), *step], env=setup_env, cwd=setup_cwd, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)  # fmt: skip
        commands: dict[str, tuple[list[str], dict[str, str], Path]] = {
            "python -I -c pass": ([args.python, "-I", "-c", "pass"], setup_env, setup_cwd)
        }
        for layout, (env, cwd) in layouts.items():
            for name, arguments in ARGUMENTS.items():
                if name == "--version" and layout != "checkout":
                    continue  # reads no config: the layout does not matter
                for tree, python in pythons.items():
                    label = f"{tree}spoold {name} ({layout})"
                    commands[label] = ([*_spoold(python), *arguments], env, cwd)
        for command, env, cwd in commands.values():
            _timed(command, env, cwd)  # byte code written, the parsed config kept, caches warm
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, (command, env, cwd) in commands.items():
                runs[name].append(_timed(command, env, cwd))
        _report(runs, args.runs, args.against is not None)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return 0


def _report(runs: dict[str, list[tuple[float, float]]], rounds: int, against: bool) -> None:
    floor = runs["python -I -c pass"]
    print(f"{'command':<52} {'wall':>9} {'cpu':>9} {'wall/pass':>10}"
          f"{'  new/old':>10}   medians of {rounds} interleaved rounds")  # fmt: skip
    for name, samples in runs.items():
        wall = statistics.median(s[0] for s in samples)
        cpu = statistics.median(s[1] for s in samples)
        ratio = statistics.median(s[0] / f[0] for s, f in zip(samples, floor, strict=True))
        versus = ""
        if against and not name.startswith(("old ", "python")):
            old = runs["old " + name]
            versus = f"{statistics.median(s[0] / o[0] for s, o in zip(samples, old, strict=True)):>10.2f}"  # fmt: skip
        print(f"{name:<52} {wall * 1000:>6.1f} ms {cpu * 1000:>6.1f} ms {ratio:>10.2f}{versus}")


if __name__ == "__main__":
    sys.exit(main())
