"""What a refusal may quote of a job file, decided in one place.

A refusal is read by more people than the file's author: reason.json is the submit group's,
and it goes on to ``spoold list``, the API, the page, spoold's log and the ``rejected``
callback. So no message about a job file quotes

- a receiver's URL (any ``url`` under ``callback:`` or ``notify:``: a chat webhook's URL is its
  key), shown as spoold's log shows one: ``scheme://host:port/***``, or ``(hidden)``;
- the value of a secret-named field (``secret``, ``password``, ``api_key``, ``api_token``,
  ``token`` at the end of its name);
- the user and password of any URL, wherever it stands (``documents.show_value`` sees to it).

``quoted`` is how a message about a place of the file shows its value; ``Redaction`` goes over
finished messages (those other layers word too: a callback's error, an executor's check) and
takes out what they quote of these values anyway.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Hashable, Iterable, Iterator
from typing import Any, Literal
from urllib.parse import urlsplit

from spoold.core.documents import DocPath, show_value, without_userinfo
from spoold.core.errors import ValidationIssue
from spoold.core.secrets import is_unquoted_field
from spoold.out.messages import receiver_hidden

#: What stands for a value a message must not quote.
HIDDEN = "(hidden)"
_RECEIVERS = frozenset({"callback", "notify"})
#: A reference is the name of a secret or a variable, not its value: it stays readable.
_REFERENCE = re.compile(r"\$\{[^{}]*\}")
#: A string quoted as ``repr`` or ``json.dumps`` quotes it, possibly cut short with "...".
_QUOTED = re.compile(r"'((?:[^'\\\n]|\\.)*)'|\"((?:[^\"\\\n]|\\.)*)\"")
#: Shorter pieces of a hidden value are not hunted on their own: "a" would take every "a".
_SHORTEST_HUNTED = 4
_CUT = "..."
#: The most values hunted (a file has a handful): a refusal's cost stays bounded. A file with
#: more hides its own secrets from its own author's messages less well, and no one else's.
_MOST_HUNTED = 512
#: A receiver's URL as ``receiver_shown`` shows it.
_SHOWN_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"/]*/\*\*\*")

Kind = Literal["secret", "url"]


def hidden_kind(path: DocPath) -> Kind | None:
    """Whether the value at ``path`` (or one it is inside) is a secret or a receiver's URL."""
    receiver = False
    for part in path:
        if not isinstance(part, str):
            continue
        if is_unquoted_field(part):
            return "secret"
        if receiver and part == "url":
            return "url"
        receiver = receiver or part in _RECEIVERS
    return None


def receiver_shown(url: Any) -> str:
    """A receiver's URL as messages show it: ``scheme://host:port/***``; ``(hidden)`` when it
    has no host to name."""
    return (receiver_hidden(url) if isinstance(url, str) else None) or HIDDEN


def quoted(value: Any, path: DocPath) -> str:
    """The value at ``path`` as a message may quote it (``show_value``, or what stands for it)."""
    kind = hidden_kind(path)
    if kind == "secret":
        return HIDDEN
    if kind == "url":
        shown = receiver_shown(value)
        return HIDDEN if shown == HIDDEN else repr(shown)
    return show_value(value)


class Redaction:
    """Takes out of finished messages what they must not quote of one job file's values.

    ``document``: the file as parsed, or None when it does not parse (then only the users and
    passwords of URLs are taken out).
    """

    def __init__(self, document: Any = None) -> None:
        # (piece, what stands for it), longest first: a URL before the query it ends with.
        pieces: dict[str, str] = {}
        for kind, value in itertools.islice(_hidden_values(document), _MOST_HUNTED):
            shown = HIDDEN if kind == "secret" else receiver_shown(value)
            for piece in _pieces(kind, value):
                pieces.setdefault(piece, shown)
        self._pieces = sorted(pieces.items(), key=lambda item: -len(item[0]))
        self._shown = dict(self._pieces)
        # One pass, longest first; a URL shown already is skipped whole: a piece of another
        # URL's path ("/hooks") must not be found inside its host ("//hooks.example").
        hunted = "|".join(re.escape(piece) for piece, _ in self._pieces)
        self._hunt = re.compile(f"(?P<shown>{_SHOWN_URL.pattern})|{hunted}") if hunted else None

    def text(self, message: str) -> str:
        """``message`` quoting none of the hidden values, nor any URL's user and password."""
        if self._hunt is not None:
            message = self._hunt.sub(self._replaced, message)
            message = _QUOTED.sub(self._cut_quote, message)
            message = message.replace(f"'{HIDDEN}'", HIDDEN)  # a piece quoted by itself
        return without_userinfo(message)

    def _replaced(self, match: re.Match[str]) -> str:
        return match.group() if match.group("shown") else self._shown[match.group()]

    def issues(self, issues: Iterable[ValidationIssue]) -> list[ValidationIssue]:
        """Each issue with its message and path as ``text`` leaves them."""
        return [
            issue._replace(message=self.text(issue.message), path=without_userinfo(issue.path))
            for issue in issues
        ]

    def _cut_quote(self, match: re.Match[str]) -> str:
        """A quoted string that is a piece of a hidden value, cut short as messages cut
        values, stands for the value too."""
        inner = match.group(1) if match.group(1) is not None else match.group(2)
        inner = inner.removesuffix(_CUT)
        if len(inner) < _SHORTEST_HUNTED:
            return match.group()
        for piece, shown in self._pieces:
            if inner in piece:
                return shown if shown == HIDDEN else repr(shown)
        return match.group()


def _hidden_values(document: Any) -> Iterator[tuple[Kind, Any]]:
    """Each value of the document a message must not quote, with why: the receivers' first."""
    stack: list[tuple[tuple[Hashable, ...], Any]] = [((), document)]
    if isinstance(document, dict):  # popped last to first
        last = sorted(document, key=lambda key: isinstance(key, str) and key in _RECEIVERS)
        stack = [((key,), document[key]) for key in last]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack.extend(((*path, key), item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend(((*path, index), item) for index, item in enumerate(value))
        elif value is not None and not isinstance(value, bool):
            kind = hidden_kind(path)
            if kind is not None:
                yield kind, value


def _pieces(kind: Kind, value: Any) -> list[str]:
    """What of a hidden value is hunted in messages: its literal text between references (a
    reference names a secret, which a message may say), as written and as ``repr`` escapes
    it; of a URL also its user and password, path and query."""
    text = str(value)
    literal = [piece for piece in _REFERENCE.split(text) if len(piece) >= _SHORTEST_HUNTED]
    found = set(literal) | {repr(piece)[1:-1] for piece in literal}
    if kind == "url" and isinstance(value, str) and not _REFERENCE.search(text):
        try:
            parts = urlsplit(text)
            userinfo = parts.netloc.rpartition("@")[0]
            rest = [userinfo, parts.path, parts.query, parts.path + "?" + parts.query]
        except ValueError:
            rest = [text.partition("://")[2]]
        found |= {piece for piece in rest if len(piece) >= _SHORTEST_HUNTED}
    return sorted(found, key=len, reverse=True)
