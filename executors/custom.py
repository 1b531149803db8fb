"""The ``custom`` executor: a script file written into the work dir and run."""

from __future__ import annotations

import os

from spoold.executors.base import ExecResult, Executor, RunContext, run_local_process

SCRIPT_NAME = ".spoold-script"


class CustomExecutor(Executor):
    """Writes ``product.script`` to the work dir and runs it (by its #! line or ``interpreter``)."""

    name = "custom"
    schema_resource = "custom.schema.json"
    reports_start = True
    script_fields = ("script",)

    def execute(self, ctx: RunContext) -> ExecResult:
        script = ctx.product["script"]
        text = script if isinstance(script, str) else "\n".join(script)
        if not text.endswith("\n"):
            text += "\n"
        path = ctx.workdir / SCRIPT_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o700)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        if ctx.run_as is not None:  # theirs to read and run, as the work dir is
            os.chown(path, ctx.run_as.uid, ctx.run_as.gid)
        args = [str(a) for a in ctx.product.get("args") or ()]
        interpreter = ctx.product.get("interpreter")
        if interpreter:
            argv = [*str(interpreter).split(), str(path), *args]
        elif text.startswith("#!"):
            argv = [str(path), *args]
        else:
            argv = ["/bin/sh", str(path), *args]
        if ctx.before_script:
            # The before-script is shell; it runs first, then the script replaces that shell.
            prelude = "\n".join(ctx.before_script) + '\nexec "$@"\n'
            argv = ["/bin/sh", "-c", prelude, "spoold-before-script", *argv]
        return run_local_process(ctx, argv)
