"""A job's hooks: pre_run, post_run, on_success, on_failure, each a few shell commands.

They run on this host, in the job's work dir, as the job's user, with the job's environment
plus ``SPOOLD_HOOK``, ``SPOOLD_JOB_STATE`` and ``SPOOLD_EXIT_CODE``, and start as the job's own
processes do (``spoold.run.process``: default signals, every process a hook started ends with it,
bounded output). A hook's failure is the job's business (``pre_run`` failing fails the
attempt), never spoold's: nothing a hook does raises out of here.

A hook is one of the job's processes: the job's cancel (``spoold cancel``, spoold's stop) ends
it as it ends the job's own (SIGTERM, ``kill_grace``, SIGKILL). After a cancel, ``pre_run``
does not start; ``post_run`` and ``on_failure`` still run, to clean up, but for at most
``kill_grace`` each: a cancel frees the job's slot within a bound the operator set.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from spoold.core.clock import Clock
from spoold.core.errors import JobDetached
from spoold.core.joblog import JobLog
from spoold.core.units import format_duration
from spoold.executors.local import shell_script
from spoold.run.process import Processes, RunAs

HOOKS = ("pre_run", "post_run", "on_success", "on_failure")
#: A hook without the job's own timeout may take this long: it must never hold a slot forever.
DEFAULT_TIMEOUT = 600.0


@dataclass(frozen=True)
class HookRunner:
    """Runs one job's hooks (``hooks:`` of its file) for one attempt."""

    hooks: Mapping[str, str | list[str]]
    env: Mapping[str, str]
    workdir: Path
    log: JobLog
    clock: Clock
    kill_grace: float
    timeout: float | None = None
    run_as: RunAs | None = None
    #: How the hooks' processes start (``spoold.run.launcher.Supervised`` in the daemon).
    processes: Processes = field(default_factory=Processes)
    #: The attempt: with the hook's name, it names the hook's run (``3.hook.post_run``).
    attempt: int = 1
    #: spoold stops and leaves the job running: see ``RunContext.detach``.
    detach: threading.Event = field(default_factory=threading.Event)
    #: The job's cancel switch (``ActiveRun.cancel``): it ends a hook that runs.
    cancel: threading.Event = field(default_factory=threading.Event)

    def run(self, name: str, *, state: str, exit_code: int | None) -> bool:
        """Run hook ``name`` if the job has it; True unless it ran and failed."""
        commands = self.hooks.get(name)
        if not commands:
            return True
        timeout, cancel = self.timeout or DEFAULT_TIMEOUT, self.cancel
        if cancel.is_set():
            if name == "pre_run":  # the attempt is over before it began
                self.log.error("hook pre_run not run: the job is cancelled")
                return False
            # Cleaning up after the cancel: its own switch, already thrown, would end it at
            # once; the slot is still held back no longer than the job's processes were.
            timeout, cancel = min(timeout, self.kill_grace), threading.Event()
            self.log.info(f"hook {name} started (after the cancel: for at most "
                          f"{format_duration(timeout)})")  # fmt: skip
        else:
            self.log.info(f"hook {name} started")
        env = {**self.env, "SPOOLD_HOOK": name, "SPOOLD_JOB_STATE": state,
               "SPOOLD_EXIT_CODE": "" if exit_code is None else str(exit_code)}  # fmt: skip
        try:
            outcome = self.processes.run(
                ["/bin/sh", "-c", shell_script((), commands)],
                # on_success and on_failure run once a job, the others once an attempt.
                key=f"{self.attempt}.hook.{name}",
                detach=self.detach,
                cwd=self.workdir,
                env=env,
                log=self.log,
                clock=self.clock,
                timeout=timeout,
                kill_grace=self.kill_grace,
                cancel=cancel,
                run_as=self.run_as,
                label=f"hook {name}",
            )
        except Exception as exc:  # a hook that cannot even start is a failed hook
            self.log.error(f"hook {name} could not run: {exc}")
            return False
        if outcome.detached:
            raise JobDetached(f"hook {name} left running")
        if outcome.exit_code == 0 and not (outcome.timed_out or outcome.cancelled):
            self.log.info(f"hook {name} succeeded")
            return True
        why = (
            f"timed out after {format_duration(timeout)}"
            if outcome.timed_out
            else "cancelled"
            if outcome.cancelled
            else outcome.error or "failed"
        )
        self.log.error(f"hook {name} failed: {why}")
        return False
