"""The submitter policy (``policy:`` in the config): which executors, ``run_as`` users, secrets and
paths of this host a submitter may use, and who the submitter is.

A subject is a user, a group or an HTTP API token (by its name); each names rules of glob
patterns. A submitter's rights are the union of the rules naming their user, any of their groups
or their token; ``default`` is for a submitter none of them names. No ``policy:`` at all limits
no one; a policy without ``default`` gives anyone it does not name nothing. Root is never
limited: root can edit the config anyway.

The policy narrows what the rest of the config allows (``allowed_run_as``, the installed
executors, ``secrets_dir``), it never widens it. Stdlib only, and light: every command loads
the config.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any, NamedTuple

from spoold.core.errors import ConfigError

#: What a rule may limit, as the config names it.
KINDS = ("executors", "run_as", "secrets", "host_paths")
#: How a ``host_paths`` pattern is read, given its key: the config's expands ``~`` as it does
#: in every path it names (``spoold.core.config.config_home``), so that it matches the job's
#: paths, expanded so too; ConfigError naming the key if it cannot.
HostPathReader = Callable[[str, str], str]


def _as_written(key: str, pattern: str) -> str:
    """A policy built without a config (a test's): its patterns as they are."""
    return pattern


class Rules(NamedTuple):
    """What a subject may use: glob patterns (``*``, ``PROXMOX_*``) per kind; none: nothing."""

    executors: tuple[str, ...] = ()
    run_as: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()
    #: Paths of this host a job may name: a container's bind mount, an ssh keyfile or
    #: known_hosts (``/srv/data/*``; ``*`` matches ``/`` too); a ``~`` at the start expanded.
    host_paths: tuple[str, ...] = ()

    @classmethod
    def from_document(
        cls, document: Any, key: str, host_path: HostPathReader = _as_written
    ) -> Rules:
        """From one entry of ``policy:``; ConfigError naming ``key`` and the part that is wrong."""
        if not isinstance(document, dict):
            raise ConfigError(f"key {key}: {document!r} is not a mapping of {', '.join(KINDS)}")
        if unknown := sorted(set(document) - set(KINDS)):
            names = ", ".join(f"{key}.{name}" for name in unknown)
            raise ConfigError(f"unknown key {names} (known: {', '.join(KINDS)})")
        found: dict[str, tuple[str, ...]] = {}
        for kind, patterns in document.items():
            if not isinstance(patterns, list) or not all(
                isinstance(p, str) and p for p in patterns
            ):
                raise ConfigError(f"key {key}.{kind}: {patterns!r} is not a list of names")
            if kind == "host_paths":
                found[kind] = tuple(dict.fromkeys(host_path(f"{key}.{kind}", p) for p in patterns))
            else:
                found[kind] = tuple(dict.fromkeys(patterns))
        return cls(**found)

    def allows(self, kind: str, name: str) -> bool:
        """Whether ``name`` (an executor, a user, a secret, a path) matches one of ``kind``'s
        patterns."""
        patterns: tuple[str, ...] = getattr(self, kind)
        return any(fnmatchcase(name, pattern) for pattern in patterns)

    def union(self, other: Rules) -> Rules:
        """What either allows."""
        kinds = zip(self, other, strict=True)
        return Rules(*(tuple(dict.fromkeys((*mine, *theirs))) for mine, theirs in kinds))


class Submitter(NamedTuple):
    """Who submitted a job file: the owner of the file dropped into incoming/, the CLI's caller,
    or an HTTP API token.

    ``name`` is the user's name, ``uid:N`` for a uid with none (a policy can name it so), or
    ``token:NAME`` for a token.
    """

    name: str
    uid: int | None
    #: The primary group, for the group list; None: not a user of this host.
    gid: int | None = None
    #: The API token's name (``policy: tokens: NAME``); None: a user.
    token: str | None = None

    @classmethod
    def of_token(cls, name: str) -> Submitter:
        """The holder of the API token named ``name``: no user of this host, never root."""
        return cls(f"token:{name}", None, None, name)

    @classmethod
    def of_uid(cls, uid: int) -> Submitter:
        """The user with this uid, as this host's user database knows it."""
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            return cls(f"uid:{uid}", uid)
        return cls(entry.pw_name, uid, entry.pw_gid)

    @classmethod
    def caller(cls) -> Submitter:
        """Who runs this process (``spoold submit``, ``validate``, ``exec``)."""
        return cls.of_uid(os.geteuid())

    @classmethod
    def named(cls, text: str) -> Submitter:
        """A user given by name, by number or as ``uid:N``; ValueError if there is none such."""
        number = text.removeprefix("uid:")
        if number.isascii() and number.isdigit():  # not '²', which int() refuses
            return cls.of_uid(int(number))
        try:
            entry = pwd.getpwnam(text)
        except KeyError:
            raise ValueError(f"there is no user {text!r} on this host") from None
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)

    @property
    def unlimited(self) -> bool:
        """Root: no policy limits it (root can change the config)."""
        return self.uid == 0

    def groups(self) -> tuple[str, ...]:
        """The names of the user's groups, the primary one first (``gid:N`` for one with none).

        Looked up when asked (a policy's check), not when known: the user database may be LDAP.
        """
        if self.gid is None or self.name.startswith("uid:"):
            return ()
        try:
            gids = os.getgrouplist(self.name, self.gid)
        except OSError:
            gids = [self.gid]
        return tuple(dict.fromkeys(_group_name(gid) for gid in gids))

    def status_fields(self) -> dict[str, Any]:
        """What status.json records of the submitter."""
        return {"submitter": self.name, "submitter_uid": self.uid}


class Policy(NamedTuple):
    """``policy:``: rules per user, per group and per token, and the default for anyone else."""

    users: Mapping[str, Rules] = {}
    groups: Mapping[str, Rules] = {}
    #: The rules of a submitter no entry names; None: nothing at all.
    default: Rules | None = None
    #: The HTTP API's tokens, by name: a token is a subject too.
    tokens: Mapping[str, Rules] = {}

    @classmethod
    def from_document(cls, document: Any, host_path: HostPathReader = _as_written) -> Policy:
        """From the config's ``policy:``; ConfigError naming the key of what is wrong."""
        if not isinstance(document, dict):
            raise ConfigError(f"key policy: {document!r} is not a mapping")
        known = ("users", "groups", "tokens", "default")
        if unknown := sorted(set(document) - set(known)):
            names = ", ".join(f"policy.{name}" for name in unknown)
            raise ConfigError(f"unknown key {names} (known: {', '.join(known)})")
        subjects: dict[str, dict[str, Rules]] = {}
        for kind in ("users", "groups", "tokens"):
            entries = document.get(kind) or {}
            if not isinstance(entries, dict):
                raise ConfigError(f"key policy.{kind}: {entries!r} is not a mapping of names")
            subjects[kind] = {
                str(name): Rules.from_document(rules, f"policy.{kind}.{name}", host_path)
                for name, rules in entries.items()
            }
        default = document.get("default")
        if default is not None:
            default = Rules.from_document(default, "policy.default", host_path)
        return cls(
            users=subjects["users"],
            groups=subjects["groups"],
            tokens=subjects["tokens"],
            default=default,
        )

    def rules_for(
        self, *, user: str | None = None, groups: Iterable[str] = (), token: str | None = None
    ) -> Rules:
        """The union of the rules naming the user, any of the groups, or the token; the
        default for a subject none of them names."""
        found = [self.users[user]] if user is not None and user in self.users else []
        found += [self.groups[group] for group in groups if group in self.groups]
        if token is not None and token in self.tokens:
            found.append(self.tokens[token])
        if not found:
            return self.default or Rules()
        rules = found[0]
        for more in found[1:]:
            rules = rules.union(more)
        return rules

    def rules_of(self, submitter: Submitter) -> Rules | None:
        """What ``submitter`` may use; None: not limited (root)."""
        if submitter.unlimited:
            return None
        if submitter.token is not None:
            return self.rules_for(token=submitter.token)
        return self.rules_for(user=submitter.name, groups=submitter.groups())


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid:{gid}"
