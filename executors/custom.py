"""The ``custom`` executor: a script file written into the work dir and run."""

from __future__ import annotations

from dataclasses import replace

from spoold.executors.base import ExecResult, Executor, RunContext, run_local_process

SCRIPT_NAME = ".spoold-script"
_VARIABLE = "SPOOLD_SCRIPT"  # carries the script to the shell that writes it


class CustomExecutor(Executor):
    """Writes ``product.script`` to the work dir and runs it (by its #! line or ``interpreter``)."""

    name = "custom"
    schema_resource = "custom.schema.json"
    reports_start = True
    supervised = True
    script_fields = ("script",)

    def execute(self, ctx: RunContext) -> ExecResult:
        script = ctx.product["script"]
        text = script if isinstance(script, str) else "\n".join(script)
        if not text.endswith("\n"):
            text += "\n"
        path = ctx.workdir / SCRIPT_NAME
        args = [str(a) for a in ctx.product.get("args") or ()]
        interpreter = ctx.product.get("interpreter")
        if interpreter:
            argv = [*str(interpreter).split(), str(path), *args]
        elif text.startswith("#!"):
            argv = [str(path), *args]
        else:
            argv = ["/bin/sh", str(path), *args]
        # The script file is written by the job's own user, in its work dir (which spoold's
        # user may not be able to write into), then the before-script runs, then the script
        # replaces that shell.
        prelude = "\n".join(
            [
                f'umask 077 && printf %s "${_VARIABLE}" > {SCRIPT_NAME} && chmod 700 {SCRIPT_NAME}'
                f" && unset {_VARIABLE} || exit 126",
                *ctx.before_script,
                'exec "$@"',
            ]
        )
        argv = ["/bin/sh", "-c", prelude, "spoold-custom", *argv]
        return run_local_process(replace(ctx, env={**ctx.env, _VARIABLE: text}), argv)
