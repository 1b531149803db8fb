"""What a submitter's policy (``policy:`` in the config) allows of a job file.

Every executor the file names (the job's and each step's), its ``run_as`` user and every
``${secret:NAME}`` anywhere in it (product, variables, hooks, callback, steps) must be in the
submitter's rules; hooks are shell commands run on this host, so they need the ``local``
executor. Admission applies this to every way in and gives each problem its line.

And who the submitter is: the owner of a dropped file, unless others could have written it.
"""

from __future__ import annotations

import grp
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from spoold.core.config import expand_home, no_home
from spoold.core.documents import DocPath, units_of
from spoold.core.policy import Rules, Submitter
from spoold.core.secrets import SECRET_NAME
from spoold.core.spool import FileOwner

#: A problem as admission locates it: (message, path, whether to point at the key).
PolicyProblem = tuple[str, DocPath, bool]

_SECRET = re.compile(rf"\$\{{secret:({SECRET_NAME.pattern})\}}")
_WHAT = {"executors": "executors", "run_as": "run_as users", "secrets": "secrets",
         "host_paths": "host paths"}  # fmt: skip
#: A product's fields that name a path of this host, given the docker, swarm and ssh executors.
_PATH_FIELDS = ("keyfile", "known_hosts")


def policy_problems(
    document: Mapping[str, Any], submitter: Submitter, rules: Rules
) -> list[PolicyProblem]:
    """What in a valid job file ``rules`` do not allow ``submitter``; [] if nothing."""
    who = f"submitter {submitter.name}"

    def given(kind: str) -> str:
        allowed = ", ".join(getattr(rules, kind)) or "none"
        return f"(the config's policy gives {submitter.name} the {_WHAT[kind]}: {allowed})"

    problems: list[PolicyProblem] = []
    for where, unit in units_of(document):
        executor = unit.get("executor")
        if isinstance(executor, str) and not rules.allows("executors", executor):
            message = f"{who} may not submit {executor} jobs {given('executors')}"
            problems.append((message, (*where, "executor"), False))
    if document.get("hooks") and not rules.allows("executors", "local"):
        message = (
            f"hooks are shell commands run on this host, as a local job's are: {who} may not "
            f"submit local jobs {given('executors')}"
        )
        problems.append((message, ("hooks",), True))
    run_as = document.get("run_as")
    if isinstance(run_as, str) and not rules.allows("run_as", run_as):
        problems.append(
            (f"{who} may not run jobs as {run_as!r} {given('run_as')}", ("run_as",), False)
        )
    for name, path in dict.fromkeys(secret_references(document)):
        if not rules.allows("secrets", name):
            problems.append((f"{who} may not use secret {name!r} {given('secrets')}", path, False))
    for text, path in host_paths(document):
        if why := _host_path_refused(text, rules):
            problems.append((f"{who} may not use the host path {text!r}: {why} "
                             f"{given('host_paths')}", path, False))  # fmt: skip
    return problems


def host_paths(document: Mapping[str, Any]) -> Iterator[tuple[str, DocPath]]:
    """Each path of this host the job's products name, with its place: a bind mount's source
    (``SRC:DST``; a volume's name is no path), an ssh ``keyfile`` or ``known_hosts``. Through
    these a container reaches the host's files and the engine's (root's) rights, and ssh reads
    a key or writes known_hosts, as spoold's user, wherever they point."""
    for unit_at, unit in units_of(document):
        product, where = unit.get("product"), (*unit_at, "product")
        if not isinstance(product, Mapping):
            continue
        for index, mount in enumerate(product.get("mounts") or ()):
            source = str(mount).split(":", 1)[0]
            # A variable may make a volume's name a path when the job runs: judged as one.
            if source.startswith(("/", "~", "$")):
                yield source, (*where, "mounts", index)
        for field in _PATH_FIELDS:
            if isinstance(value := product.get(field), str):
                yield value, (*where, field)


def _host_path_refused(text: str, rules: Rules) -> str | None:
    """Why ``rules`` do not allow the host path ``text``, or None: the path as written out and
    where it leads now (links followed) must both match; one known only when the job runs
    (``${...}``) cannot be judged, and is not allowed."""
    if "${" in text:
        return "a variable or a secret in it is known only when the job runs"
    expanded = expand_home(text)  # as the executor reads it, and the policy's patterns are
    if expanded is None:
        return no_home(text)
    written, leads = os.path.normpath(expanded), os.path.realpath(expanded)
    if not rules.allows("host_paths", written):
        return "it is not among their host paths"
    if not rules.allows("host_paths", leads):
        return f"it leads to {leads}"
    return None


def secret_references(value: Any, path: DocPath = ()) -> Iterator[tuple[str, DocPath]]:
    """Each ``${secret:NAME}`` in a document's values, with the path of the value it is in."""
    if isinstance(value, str):
        if "${secret:" in value:
            yield from ((match.group(1), path) for match in _SECRET.finditer(value))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from secret_references(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from secret_references(item, (*path, index))


def shared_writer_problem(owner: FileOwner, submitter: Submitter) -> str | None:
    """Why a file's owner is not known to be who wrote it: others may write it too; or None.

    Its owner's rights would go to whoever else wrote into it, and on the package's incoming/
    (setgid) every file's group is the submitters' group. A group of the owner's own (a user
    private group, as Debian makes them) is theirs alone.
    """
    if owner.mode & 0o002:
        whom = "everyone"
    elif owner.mode & 0o020 and not _own_group(owner.gid, submitter.name):
        whom = f"its group {_group_name(owner.gid)}"
    else:
        return None
    return (
        f"the file is writable by {whom} (mode {owner.mode:04o}): what it says may not be "
        f"{submitter.name}'s, whose policy would apply; make it writable by its owner only "
        "(chmod go-w before it goes into incoming/; `spoold submit` does)"
    )


def _own_group(gid: int, user: str) -> bool:
    try:
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return group.gr_name == user and set(group.gr_mem) <= {user}


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
