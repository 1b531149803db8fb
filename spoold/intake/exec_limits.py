"""What Linux's execve(2) would refuse of a job before its first process: refused at admission.

A job's variables are environment variables of its processes, hooks included, and the local,
docker and swarm executors hand their script to ``/bin/sh -c`` as one argument (the custom
executor hands its script over in one environment variable). Linux refuses an exec with
E2BIG ("Argument list too long") when one argument or one ``NAME=value`` string, with its NUL,
is longer than MAX_ARG_STRLEN (32 pages: 131072 bytes), or when all of them together pass
ARG_MAX (a quarter of the stack limit: 2 MiB by default). A job that cannot start is refused
when it is submitted, not when it runs.

The text is judged as written: a ``${secret:NAME}`` is known only when the job runs, and the
config's ``global_before_script``, which comes before a script, is not counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spoold.core.documents import DocPath, units_of
from spoold.executors.local import shell_script

#: Linux's longest argument or environment string, its terminating NUL included (32 pages).
MAX_ARG_STRLEN = 131072
#: The most a job's variables may take together, as ``NAME=value`` strings with their NULs:
#: half of ARG_MAX's default, which leaves room for spoold's variables, the rest of the
#: environment and the script.
MAX_VARIABLES_BYTES = 1 << 20

_Problem = tuple[str, DocPath, bool]  # message, path, whether to point at the key
#: The variable the custom executor carries its script in (``executors/custom.py``).
_CUSTOM_SCRIPT = "SPOOLD_SCRIPT"


def exec_problems(document: Mapping[str, Any]) -> list[_Problem]:
    """What in a job's variables and scripts no process could be started with; [] if none."""
    job_variables = _variables(document.get("variables"))
    problems = [
        *_each_variable(document.get("variables"), ("variables",)),
        *_all_variables(job_variables, ("variables",)),
    ]
    for where, unit in units_of(document):
        executor = unit.get("executor", document.get("executor"))
        if where:  # a step runs with the job's variables and its own over them
            own = unit.get("variables")
            problems += _each_variable(own, (*where, "variables"))
            if isinstance(own, Mapping) and own:
                merged = {**job_variables, **_variables(own)}
                problems += _all_variables(merged, (*where, "variables"))
        product = unit.get("product")
        if isinstance(executor, str) and isinstance(product, Mapping):
            problems += _script_problems(executor, product, (*where, "product"))
    return problems


def _variables(given: Any) -> dict[str, int]:
    """Each variable's ``NAME=value\\0`` in bytes, as written."""
    if not isinstance(given, Mapping):
        return {}
    return {str(name): _env_bytes(str(name), value) for name, value in given.items()}


def _env_bytes(name: str, value: Any) -> int:
    text = _as_text(value)
    chars = len(name) + 1 + len(text) + 1
    # UTF-8 takes at most 4 bytes a character: most values need no encoding to be judged.
    if chars * 4 < MAX_ARG_STRLEN:
        return chars
    return len(f"{name}={text}".encode("utf-8", "surrogatepass")) + 1


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _each_variable(given: Any, where: DocPath) -> list[_Problem]:
    problems: list[_Problem] = []
    for name, size in _variables(given).items():
        if size > MAX_ARG_STRLEN:
            message = (
                f"variable {name} is {size - 1} bytes as {name}=value, over Linux's limit of "
                f"{MAX_ARG_STRLEN - 1} bytes for one environment variable (MAX_ARG_STRLEN): "
                "no process could start with it; pass a large value in a file (an artifact of "
                "an earlier step, or a secret)"
            )
            problems.append((message, (*where, name), False))
    return problems


def _all_variables(sizes: Mapping[str, int], where: DocPath) -> list[_Problem]:
    total = sum(sizes.values())
    if total <= MAX_VARIABLES_BYTES:
        return []
    message = (
        f"the variables take {total} bytes together (as NAME=value strings), over spoold's "
        f"limit of {MAX_VARIABLES_BYTES} bytes (1 MiB, half of Linux's ARG_MAX of 2 MiB for "
        "a process's arguments and environment together)"
    )
    return [(message, where, True)]


def _script_problems(executor: str, product: Mapping[str, Any], where: DocPath) -> list[_Problem]:
    """A script that reaches its shell as one argument (or one environment string), past
    MAX_ARG_STRLEN. ssh sends its script over stdin: no limit."""
    if executor == "local":
        field, lines = "commands", product.get("commands")
        text = _shell_text(lines)
    elif executor in ("docker", "swarm"):
        fields = [name for name in ("before_script", "script", "commands") if name in product]
        field = fields[-1] if fields else "commands"
        joined: list[str] = []
        for name in fields:
            joined += _lines(product.get(name))
        text = _shell_text(joined)
    elif executor == "custom":
        field, script = "script", product.get("script")
        body = script if isinstance(script, str) else "\n".join(_lines(script))
        text = f"{_CUSTOM_SCRIPT}={body}" + ("" if body.endswith("\n") else "\n")
    else:
        return []
    if text is None or len(text) * 4 < MAX_ARG_STRLEN:
        return []
    size = len(text.encode("utf-8", "surrogatepass"))
    if size < MAX_ARG_STRLEN:
        return []
    how = "the environment string" if executor == "custom" else "the argument"
    message = (
        f"the script is {size} bytes as {how} that carries it to its shell, over Linux's limit "
        f"of {MAX_ARG_STRLEN - 1} bytes for one (MAX_ARG_STRLEN): it could not start; put the "
        "bulk of it in a file the job reads"
    )
    return [(message, (*where, field), False)]


def _shell_text(commands: Any) -> str | None:
    """The script as the executor builds it from ``commands`` (a string or lines)."""
    if isinstance(commands, str):
        return shell_script((), commands)
    if isinstance(commands, list) and all(isinstance(line, str) for line in commands):
        return shell_script((), commands)
    return None


def _lines(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [str(line) for line in value] if isinstance(value, list) else []
