"""The messages of notifications: a mail, or a webhook's body in its format's own shape.

Pure: from the items of spoold.out.notices (one, or several folded into a digest) to an
``EmailMessage`` or a JSON-able body. Every text is bounded: a chat message carries a shorter
log tail than a mail, and a digest lists at most ``DIGEST_LIST`` jobs (and says how many more).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from spoold.core.secrets import MASK

#: A digest lists at most this many jobs; the rest are counted.
DIGEST_LIST = 50
#: The most of a log tail a chat message carries (Slack's section text stops at 3000).
CHAT_TAIL_CHARS = 2500
#: Teams and Slack cards: at most this many jobs get a section (or a line) of their own.
CARD_JOBS = 10
#: The ``type`` of a ``json`` webhook's body.
JSON_TYPE = "spoold.notification"

Item = dict[str, Any]


def title(item: Item) -> str:
    """One line on one change: ``job backup-7 failed on host1``."""
    what = f"file {item.get('file')}" if item.get("event") == "rejected" else "job"
    if item.get("event") == "rejected":
        return f"{what} rejected on {item.get('host')}"
    return f"{what} {item.get('job_id')} {item.get('event')} on {item.get('host')}"


def digest_title(items: Sequence[Item]) -> str:
    """One line on a digest: ``20 jobs on host1: 18 failed, 2 cancelled``: the jobs counted
    once each (a job retrying twice is one job), its notices by event."""
    counts = Counter(str(item.get("event")) for item in items)
    parts = ", ".join(f"{n} {event}" for event, n in sorted(counts.items()))
    files = counts["rejected"]  # a rejected file is no job; each rejection is a file dropped
    jobs = len({item.get("job_id") for item in items if item.get("event") != "rejected"})
    what = " and ".join(
        f"{n} {noun}" + ("" if n == 1 else "s") for n, noun in ((jobs, "job"), (files, "file")) if n
    )
    return f"{what} on {items[0].get('host')}: {parts}"


def _facts(item: Item) -> list[tuple[str, str]]:
    """What a message says of one change, as (name, value), the empty ones left out."""
    facts = [
        ("Job", item.get("job_id")), ("File", item.get("file")), ("Event", item.get("event")),
        ("State", item.get("state")), ("Host", item.get("host")),
        ("Attempt", item.get("attempt") or None), ("Exit code", item.get("exit_code")),
        ("Executor", item.get("executor")), ("Error", item.get("error")),
        ("Next attempt at", item.get("next_attempt_at")), ("At", item.get("timestamp")),
        ("Page", item.get("link")),
    ]  # fmt: skip
    return [(name, str(value)) for name, value in facts if value is not None and value != ""]


def _line(item: Item) -> str:
    """A digest's line on one change."""
    return f"{item.get('job_id') or item.get('file')}: {_what(item)}"


def _what(item: Item) -> str:
    """The event, and the first line of the error if there is one."""
    error = str(item.get("error") or "").splitlines()
    return f"{item.get('event')} ({error[0][:300]})" if error else str(item.get("event"))


def _listed(items: Sequence[Item]) -> tuple[Sequence[Item], int]:
    return items[:DIGEST_LIST], max(len(items) - DIGEST_LIST, 0)


def _chat_tail(item: Item) -> str | None:
    tail = item.get("log_tail")
    if not tail:
        return None
    return str(tail)[-CHAT_TAIL_CHARS:]


# -- mail ---------------------------------------------------------------------------------------


def mail(items: Sequence[Item], *, sender: str, to: Sequence[str], message_id: str,
         window: float) -> EmailMessage:  # fmt: skip
    """The mail of one change (its log's tail attached), or of a digest of several."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(to)
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = f"<{message_id}@spoold>"
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to this
    if len(items) == 1:
        item = items[0]
        message["Subject"] = f"[spoold] {title(item)}"
        lines = [f"spoold: {title(item)}.", ""]
        lines += [f"{name}: {value}" for name, value in _facts(item)]
        tail = item.get("log_tail")
        if tail:
            lines += ["", "The last lines of its log are attached (log-tail.txt)."]
        message.set_content("\n".join(lines) + "\n")
        if tail:
            message.add_attachment(
                str(tail) + "\n", subtype="plain", filename="log-tail.txt", charset="utf-8"
            )
        return message
    message["Subject"] = f"[spoold] {digest_title(items)}"
    listed, more = _listed(items)
    lines = [
        f"spoold: {digest_title(items)}.",
        f"They are told together: one message at most every {_duration(window)}, and what "
        "comes in a burst waits a moment for the rest of it.",
        "",
    ]
    for item in listed:
        lines.append(f"- {_line(item)}")
        if item.get("link"):
            lines.append(f"  {item['link']}")
    if more:
        lines.append(f"... and {more} more")
    message.set_content("\n".join(lines) + "\n")
    return message


def _duration(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} minute(s)"
    return f"{seconds:g} second(s)"


# -- webhooks -----------------------------------------------------------------------------------


def webhook_body(form: str, items: Sequence[Item], *, window: float) -> dict[str, Any]:
    """A webhook's JSON body in ``form``: slack, mattermost, teams or json."""
    build = {"slack": _slack, "mattermost": _mattermost, "teams": _teams, "json": _json}[form]
    return build(items, window)


def _json(items: Sequence[Item], window: float) -> dict[str, Any]:
    """The documented plain object (README: Notifications)."""
    return {
        "type": JSON_TYPE,
        "version": 1,
        "digest": len(items) > 1,
        "count": len(items),
        "window_seconds": window,
        "summary": title(items[0]) if len(items) == 1 else digest_title(items),
        "notices": [dict(item) for item in items],
    }


def _slack(items: Sequence[Item], window: float) -> dict[str, Any]:
    """A Slack incoming webhook's message: ``text`` (the fallback) and Block Kit ``blocks``."""
    if len(items) == 1:
        item = items[0]
        facts = "\n".join(f"*{name}:* {_slack_escape(value)}" for name, value in _facts(item))
        blocks: list[dict[str, Any]] = [
            {"type": "header", "text": {"type": "plain_text", "text": title(item)[:150]}},
            {"type": "section", "text": {"type": "mrkdwn", "text": facts[:3000]}},
        ]
        if (tail := _chat_tail(item)) is not None:
            blocks.append({"type": "section", "text": {
                "type": "mrkdwn", "text": f"```{_fenced(_slack_escape(tail))}```"[:3000]}})  # fmt: skip
        return {"text": title(item), "blocks": blocks}
    shown = items[: CARD_JOBS * 3]  # a section's text stops at 3000 characters
    lines = [f"• {_slack_link(item)}: {_slack_escape(_what(item))}" for item in shown]
    if len(items) > len(shown):
        lines.append(f"… and {len(items) - len(shown)} more")
    together = f"Told together: they came within {_duration(window)} of the last message."
    return {
        "text": digest_title(items),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": digest_title(items)[:150]}},
            {"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)[:3000]}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": together}]},
        ],
    }


def _fenced(text: str) -> str:
    """A log's tail inside a code block: a job's own ``` would end the block early."""
    return text.replace("```", "'''")


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_link(item: Item) -> str:
    who = _slack_escape(str(item.get("job_id") or item.get("file")))
    return f"<{item['link']}|{who}>" if item.get("link") else who


def _mattermost(items: Sequence[Item], window: float) -> dict[str, Any]:
    """A Mattermost incoming webhook's message: Markdown ``text``."""
    if len(items) == 1:
        item = items[0]
        lines = [f"#### {title(item)}"]
        lines += [f"**{name}:** {value}" for name, value in _facts(item) if name != "Page"]
        if item.get("link"):
            lines.append(f"[Open the job]({item['link']})")
        if (tail := _chat_tail(item)) is not None:
            lines += ["```", _fenced(tail), "```"]
        return {"text": "\n".join(lines), "username": "spoold"}
    listed, more = _listed(items)
    lines = [f"#### {digest_title(items)}", "", "| Job | Event | Error |", "|---|---|---|"]
    for item in listed:
        who = str(item.get("job_id") or item.get("file"))
        if item.get("link"):
            who = f"[{who}]({item['link']})"
        error = (str(item.get("error") or "").splitlines() or [""])[0][:200].replace("|", "\\|")
        lines.append(f"| {who} | {item.get('event')} | {error} |")
    if more:
        lines.append(f"\n... and {more} more")
    lines.append(f"\n_Told together: they came within {_duration(window)} of the last message._")
    return {"text": "\n".join(lines), "username": "spoold"}


def _teams(items: Sequence[Item], window: float) -> dict[str, Any]:
    """A Microsoft Teams incoming webhook's legacy actionable message card (MessageCard)."""
    failed = any(item.get("event") in ("failed", "rejected") for item in items)
    card: dict[str, Any] = {
        "@type": "MessageCard",
        "@context": "https://schema.org/extensions",
        "themeColor": "C4314B" if failed else "237B4B",
    }
    if len(items) == 1:
        item = items[0]
        section: dict[str, Any] = {
            "activityTitle": title(item),
            "facts": [{"name": n, "value": v} for n, v in _facts(item) if n != "Page"],
        }
        if (tail := _chat_tail(item)) is not None:
            section["text"] = "<pre>" + _html_escape(tail) + "</pre>"
        card.update(summary=title(item), title=title(item), sections=[section])
        if item.get("link"):
            card["potentialAction"] = [{
                "@type": "OpenUri", "name": "Open the job",
                "targets": [{"os": "default", "uri": item["link"]}],
            }]  # fmt: skip
        return card
    sections = [
        {"activityTitle": _line(item),
         "facts": [{"name": name, "value": value} for name, value in _facts(item)]}
        for item in items[:CARD_JOBS]
    ]  # fmt: skip
    if len(items) > CARD_JOBS:
        sections.append({"text": f"... and {len(items) - CARD_JOBS} more"})
    card.update(
        summary=digest_title(items), title=digest_title(items), sections=sections,
        text=f"Told together: they came within {_duration(window)} of the last message.",
    )  # fmt: skip
    return card


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def url_shown(url: str) -> str:
    """Where a URL goes, as spoold's log says it: its scheme, host and port; never the user and
    password in it, nor its path and query, which often hold a webhook's key or a token."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed IPv6 bracket: nothing of it is said
        return "a URL that cannot be parsed"
    host = parts.hostname or ""
    if not host:
        return "a URL without a host"
    try:
        port = parts.port
    except ValueError:  # not a number: nothing of it is said
        port = None
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + ("" if port is None else f":{port}")


def receiver_hidden(url: str) -> str | None:
    """``url`` as a message or the page shows a receiver's: ``scheme://host:port/***``, that
    there is more than where it goes, not shown; None where it names no host to say (the
    caller says what stands for it)."""
    try:
        if not urlsplit(url).hostname:
            return None
    except ValueError:  # an unclosed IPv6 bracket
        return None
    return f"{url_shown(url)}/{MASK}"


#: A URL inside an error text: a scheme, ``://``, then up to a space, quote or bracket.
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()]+")
#: urllib3's ``Max retries exceeded with url: /hook?key=... (Caused by ...)``: a request
#: target, whichever URL it came from.
_TARGET_IN_TEXT = re.compile(r"(\burl: )\S+")
#: What stands for a part of a URL taken out of an error text.
HIDDEN = "(hidden)"
#: A piece of a URL shorter than this is not hunted through the text on its own (a user
#: ``a`` would take every ``a`` out of the message); it is still taken out with the rest.
_SHORTEST_HUNTED = 3


def error_shown(text: str, url: str | None) -> str:
    """An error text about posting to ``url`` (a requests or urllib3 exception's, a traceback)
    with nothing of ``url`` but what ``url_shown`` says: every URL in it shown as
    ``url_shown`` shows it, and the user, the password, the path, the query and the fragment
    of ``url`` taken out wherever they stand, as written or as requests re-quoted them.
    Call it before the text is cut short: a piece cut in two is no longer found. ``url``
    None: no URL known (the URLs in the text are still shown so)."""
    text = _URL_IN_TEXT.sub(lambda found: url_shown(found.group()), text)
    for piece in _secret_pieces(url) if url else ():
        text = text.replace(piece, HIDDEN)
    return _TARGET_IN_TEXT.sub(lambda found: found.group(1) + HIDDEN, text)


def _secret_pieces(url: str) -> list[str]:
    """The parts of ``url`` an error text must not show, longest first (a path before the
    path and query it begins), each also percent-quoted as requests sends it and unquoted."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed IPv6 bracket: all but the scheme is hunted
        rest = url.partition("://")[2]
        return sorted({p for p in (url, rest, unquote(rest)) if p}, key=len, reverse=True)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    userinfo = parts.netloc.rpartition("@")[0]
    whole = [userinfo, target, f"#{parts.fragment}" if parts.fragment else ""]
    alone = [parts.username or "", parts.password or "", parts.path, parts.query, parts.fragment]
    pieces = {p for p in whole if p and p != "/"}
    pieces |= {p for p in alone if len(p) >= _SHORTEST_HUNTED}
    pieces |= {quote(p, safe="!#$%&'()*+,/:;=?@[]~") for p in pieces}  # requests.requote_uri
    pieces |= {unquote(p) for p in pieces}
    return sorted((p for p in pieces if p and p != "/"), key=len, reverse=True)
