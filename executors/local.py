"""The ``local`` executor: the job's commands in one shell on this host."""

from __future__ import annotations

import shlex

from spoold.executors.base import (
    ExecResult,
    Executor,
    RunContext,
    run_local_process,
    within_workdir,
)


class LocalExecutor(Executor):
    """Runs ``product.commands``: a string as one script, a list in order up to its first failure."""

    name = "local"
    schema_resource = "local.schema.json"
    reports_start = True
    supervised = True
    script_fields = ("commands",)

    def execute(self, ctx: RunContext) -> ExecResult:
        shell = str(ctx.product.get("shell", "/bin/sh"))
        before = ctx.before_script
        if ctx.product.get("cwd"):
            # Made by the job's own user: spoold's may not write into the job's work dir.
            cwd = shlex.quote(str(within_workdir(ctx, str(ctx.product["cwd"]))))
            before = (f"mkdir -p -- {cwd} && cd -- {cwd} || exit 126", *before)
        script = shell_script(before, ctx.product["commands"])
        return run_local_process(ctx, [shell, "-c", script])


def shell_script(before: tuple[str, ...], commands: str | list[str]) -> str:
    """One script: the global before-script, then the commands."""
    lines = list(before)
    if isinstance(commands, str):
        lines.append(commands)
    else:
        # `set -e` is ignored inside `if`, `&&` and functions; an explicit check per command is not.
        lines.extend(
            f"{command}\n_spoold_rc=$?; [ $_spoold_rc -eq 0 ] || exit $_spoold_rc"
            for command in commands
        )
    return "\n".join(lines) + "\n"
