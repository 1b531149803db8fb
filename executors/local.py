"""The ``local`` executor: the job's commands in one shell on this host."""

from __future__ import annotations

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
    script_fields = ("commands",)

    def execute(self, ctx: RunContext) -> ExecResult:
        shell = str(ctx.product.get("shell", "/bin/sh"))
        cwd = ctx.workdir
        if ctx.product.get("cwd"):
            cwd = within_workdir(ctx, str(ctx.product["cwd"]))
            cwd.mkdir(parents=True, exist_ok=True)
        script = shell_script(ctx.before_script, ctx.product["commands"])
        return run_local_process(ctx, [shell, "-c", script], cwd)


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
