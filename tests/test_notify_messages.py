"""Notifications' pieces without a server: the messages each format gets, the config's keys and
what an invalid one says, a job's own ``notify:``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from spoold.core.config import ApiSettings, Config, NotifyTarget, load_config
from spoold.core.errors import CallbackError, ConfigError
from spoold.out.messages import DIGEST_LIST, mail, url_shown, webhook_body
from spoold.out.notices import Notices, job_link, target_id
from spoold.out.notify import describe


def item(job_id: str = "backup-7", **changes: Any) -> dict[str, Any]:
    found: dict[str, Any] = {
        "job_id": job_id, "event": "failed", "state": "failed", "error": "exit code 3",
        "exit_code": 3, "attempt": 2, "executor": "local", "host": "host1",
        "link": f"https://spoold.test/jobs/{job_id}", "next_attempt_at": None,
        "log_tail": "line one\nline <two> & more", "timestamp": "2026-11-22T12:00:00.000000Z",
    }  # fmt: skip
    found.update(changes)
    return found


def test_a_mail_names_the_job_its_state_and_host_and_attaches_the_tail() -> None:
    message = mail([item()], sender="s@example.net", to=["a@example.net", "b@example.net"],
                   message_id="abc", window=300)  # fmt: skip
    assert message["Subject"] == "[spoold] job backup-7 failed on host1"
    assert (
        message["To"] == "a@example.net, b@example.net" and message["Message-ID"] == "<abc@spoold>"
    )
    assert message["Auto-Submitted"] == "auto-generated", "RFC 3834: no vacation replies"
    body = message.get_body(("plain",))
    assert body is not None
    text = body.get_content()
    for line in ("Error: exit code 3", "Attempt: 2", "Exit code: 3", "Host: host1",
                 "Page: https://spoold.test/jobs/backup-7"):  # fmt: skip
        assert line in text
    (attached,) = message.iter_attachments()
    assert attached.get_filename() == "log-tail.txt"
    assert attached.get_content() == "line one\nline <two> & more\n"


def test_a_mail_without_a_log_or_a_page_says_neither() -> None:
    message = mail([item(log_tail=None, link=None)], sender="s@example.net", to=["a@example.net"],
                   message_id="x", window=60)  # fmt: skip
    assert list(message.iter_attachments()) == []
    assert "Page:" not in message.as_string() and "attached" not in message.as_string()


def test_a_digest_lists_each_job_and_bounds_the_list() -> None:
    items = [item(f"job-{n:03d}") for n in range(DIGEST_LIST + 5)]
    items[0] = item("job-000", event="cancelled", state="cancelled", error=None)
    message = mail(items, sender="s@example.net", to=["a@example.net"], message_id="d",
                   window=300)  # fmt: skip
    n = DIGEST_LIST + 5
    assert message["Subject"] == f"[spoold] {n} jobs on host1: 1 cancelled, {n - 1} failed"
    assert message["Auto-Submitted"] == "auto-generated"
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "- job-000: cancelled\n" in text and "- job-001: failed (exit code 3)" in text
    assert "https://spoold.test/jobs/job-049" in text and "job-050" not in text
    assert "... and 5 more" in text and "5 minute(s)" in text


def test_slack_gets_text_and_blocks_with_the_tail_escaped() -> None:
    body = webhook_body("slack", [item()], window=300)
    assert body["text"] == "job backup-7 failed on host1"
    header, facts, tail = body["blocks"]
    assert header == {"type": "header", "text": {"type": "plain_text", "text": body["text"]}}
    assert "*Error:* exit code 3" in facts["text"]["text"]
    assert tail["text"] == {"type": "mrkdwn", "text": "```line one\nline &lt;two&gt; &amp; more```"}
    digest = webhook_body("slack", [item("a"), item("b", link=None)], window=300)
    assert digest["text"] == "2 jobs on host1: 2 failed"
    lines = digest["blocks"][1]["text"]["text"].splitlines()
    assert lines == ["• <https://spoold.test/jobs/a|a>: failed (exit code 3)",
                     "• b: failed (exit code 3)"]  # fmt: skip


def test_mattermost_gets_markdown_text() -> None:
    body = webhook_body("mattermost", [item()], window=300)
    assert body["username"] == "spoold"
    text = body["text"]
    assert text.startswith("#### job backup-7 failed on host1\n")
    assert "[Open the job](https://spoold.test/jobs/backup-7)" in text
    assert "```\nline one\nline <two> & more\n```" in text
    digest = webhook_body("mattermost", [item("a", error="x | y"), item("b")], window=60)
    assert "| [a](https://spoold.test/jobs/a) | failed | x \\| y |" in digest["text"]


def test_teams_gets_a_message_card() -> None:
    card = webhook_body("teams", [item()], window=300)
    assert card["@type"] == "MessageCard" and card["@context"] == "https://schema.org/extensions"
    assert card["title"] == card["summary"] == "job backup-7 failed on host1"
    (section,) = card["sections"]
    assert {"name": "Error", "value": "exit code 3"} in section["facts"]
    assert section["text"] == "<pre>line one\nline &lt;two&gt; &amp; more</pre>"
    (action,) = card["potentialAction"]
    assert action["targets"] == [{"os": "default", "uri": "https://spoold.test/jobs/backup-7"}]
    digest = webhook_body("teams", [item(f"j{n}") for n in range(12)], window=300)
    assert len(digest["sections"]) == 11 and digest["sections"][-1]["text"] == "... and 2 more"


def test_json_is_the_documented_object() -> None:
    body = webhook_body("json", [item()], window=300)
    assert body == {
        "type": "spoold.notification", "version": 1, "digest": False, "count": 1,
        "window_seconds": 300, "summary": "job backup-7 failed on host1", "notices": [item()],
    }  # fmt: skip


def test_a_rejected_file_is_told_by_its_name() -> None:
    notices = Notices(Config().notify, hostname="host1")
    found = notices.rejection_item({"file": "bad.yaml", "reason": "not YAML", "code": "syntax"},
                                   None)  # fmt: skip
    body = webhook_body("json", [found], window=1)
    assert body["summary"] == "file bad.yaml rejected on host1"
    assert body["notices"][0]["error"] == "not YAML"


def write(tmp_path: Path, **document: Any) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_the_config_reads_targets_the_mail_server_and_the_window(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("")
    config = load_config(write(
        tmp_path, mail={"host": "smtp.example.net", "user": "u", "password_secret": "smtp",
                        "from": "spoold@example.net", "ca_file": "ca.pem"},
        notify=[{"email": {"to": "ops@example.net"}},
                {"webhook": {"url": "${secret:slack}", "format": "slack"},
                 "on": ["failed", "rejected"]}],
        notify_window="2m",
    ), env={})  # fmt: skip
    settings = config.notify
    assert settings.window == 120.0
    assert settings.mail is not None and settings.mail.port == 587
    assert settings.mail.security == "starttls" and settings.mail.ca_file == tmp_path / "ca.pem"
    email, chat = settings.defaults
    assert email == NotifyTarget("email", to=("ops@example.net",))
    assert chat.on == frozenset({"failed", "rejected"}) and chat.format == "slack"
    tls = load_config(write(tmp_path, mail={"host": "h", "security": "tls"}), env={})
    assert tls.notify.mail is not None and tls.notify.mail.port == 465
    for relay in ("127.0.0.1", "localhost", "::1", "127.0.0.53"):
        plain = load_config(write(tmp_path, mail={"host": relay, "security": "none"}), env={})
        assert plain.notify.mail is not None and plain.notify.mail.security == "none"
    assert Config().notify.window == 300.0 and Config().notify.defaults == ()


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"notify": [{"email": {"to": ["ops@example.net"]}}]}, "key notify: email targets need"),
        ({"notify": [{"webhook": {"url": "ftp://x"}}]}, "notify.0.webhook.url"),
        (
            {"notify": [{"webhook": {"url": "http://x", "format": "irc"}}]},
            "notify.0.webhook.format",
        ),
        ({"notify": [{"webhook": {"url": "http://x"}, "on": ["started"]}]}, "notify.0.on"),
        ({"notify": [{"email": {"to": ["x"]}}], "mail": {"host": "h"}}, "notify.0.email.to"),
        ({"mail": {"port": 25}}, "mail"),
        ({"mail": {"host": "h", "security": "ssl"}}, "mail.security"),
        ({"mail": {"host": "h", "user": "u"}}, "mail"),
        ({"mail": {"host": "h", "user": "u", "password_secret": "../x"}}, "mail.password_secret"),
        ({"notify_window": "soon"}, "notify_window"),
        # A login without TLS sent the password in clear (AUTH PLAIN), to any host.
        (
            {
                "mail": {
                    "host": "127.0.0.1",
                    "security": "none",
                    "user": "u",
                    "password_secret": "smtp",
                }
            },
            "mail.user: a login goes only over TLS",
        ),
        ({"mail": {"host": "10.0.0.1", "security": "none"}}, "mail.security: none is for a relay"),
        ({"mail": {"host": "smtp.example.net", "security": "none"}}, "on loopback"),
    ],
)
def test_an_invalid_notification_config_names_the_key(
    tmp_path: Path, document: dict[str, Any], message: str
) -> None:
    for check_schema in (True, False):
        with pytest.raises(ConfigError, match=message):
            load_config(write(tmp_path, **document), env={}, check_schema=check_schema)


def test_a_jobs_own_notify_replaces_the_configs() -> None:
    config = Config()._replace(notify=Config().notify._replace(
        defaults=(NotifyTarget("webhook", url="http://default"),)))  # fmt: skip
    notices = Notices.for_config(config)
    assert notices.targets({"executor": "local"}) == config.notify.defaults
    assert notices.targets({"notify": []}) == ()
    (own,) = notices.targets({"notify": [{"webhook": {"url": "http://own"}, "on": ["succeeded"]}]})
    assert own.url == "http://own" and own.wants("succeeded") and not own.wants("failed")
    with pytest.raises(CallbackError, match="email targets need a mail server"):
        notices.targets({"notify": [{"email": {"to": ["a@example.net"]}}]})
    with pytest.raises(CallbackError, match=r"key notify.0.on: name at least one event"):
        notices.targets({"notify": [{"webhook": {"url": "http://x"}, "on": []}]})


def test_a_target_is_known_by_where_it_goes_and_the_link_by_the_api(tmp_path: Path) -> None:
    a = NotifyTarget("webhook", url="http://x", on=frozenset({"failed"}))
    assert target_id(a) == target_id(a._replace(on=frozenset({"succeeded"})))
    assert target_id(a) != target_id(a._replace(format="slack"))
    # An empty config of its own: not /etc/spoold/config.yaml, which the package test installs
    # (with the API on) while other tests run.
    (empty := tmp_path / "config.yaml").write_text("")
    config = load_config(empty, env={})._replace(hostname="box")
    assert job_link(config, "j") is None
    wide = config._replace(api=ApiSettings(host="0.0.0.0", port=8420))
    assert job_link(wide, "run@2026-11-22T12:00:00Z") == (
        "http://box:8420/jobs/run%402026-11-22T12%3A00%3A00Z"
    )
    public = config._replace(api=ApiSettings(public_url="https://spoold.test"))
    assert job_link(public, "j") == "https://spoold.test/jobs/j"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://admin:PLAINPW@127.0.0.1:8099/err/KEY?sig=Q", "http://127.0.0.1:8099"),
        ("https://hooks.example.net/services/T0/B0/SECRETPATH", "https://hooks.example.net"),
        ("http://[::1]:80/x", "http://[::1]:80"),
        ("http://user@host:notaport/x", "http://host"),
        ("not a url", "a URL without a host"),
    ],
)
def test_a_url_in_spoolds_log_is_its_scheme_host_and_port(url: str, shown: str) -> None:
    """A webhook's or a callback's credentials were written to spoold's log: a notification
    target by its netloc (user:password@host), a callback's failures by the whole URL, its
    path and query (often the hook's key) on every retry."""
    assert url_shown(url) == shown
    target = NotifyTarget("webhook", url=url, format="slack")
    assert describe(target) == f"slack webhook at {shown}"


def test_a_tail_that_holds_a_fence_stays_inside_its_code_block() -> None:
    """A job printing ``` closed Slack's code block around its tail (Mattermost's was kept)."""
    body = webhook_body("slack", [item(log_tail="a\n```\n*bold* <!channel>")], window=300)
    text = body["blocks"][2]["text"]["text"]
    assert text == "```a\n'''\n*bold* &lt;!channel&gt;```"


def test_a_digest_of_rejected_files_calls_them_files_and_says_why_they_come_together() -> None:
    """A digest of two rejected files was "2 jobs on host1: 2 rejected", and a first message
    said they came while the last message was less than the window old."""
    rejected: dict[str, Any] = {"event": "rejected", "file": "a.yaml", "job_id": None}
    files = [item(**rejected), item(**{**rejected, "file": "b.yaml"})]
    message = mail(files, sender="s@example.net", to=["a@example.net"], window=300,
                   message_id="m")  # fmt: skip
    assert message["Subject"] == "[spoold] 2 files on host1: 2 rejected"
    text = str(message.get_content())
    assert "less than" not in text and "one message at most every 5 minute(s)" in text
    both = mail([files[0], item()], sender="s@example.net", to=["a@example.net"], window=300,
                message_id="n")  # fmt: skip
    assert both["Subject"] == "[spoold] 1 job and 1 file on host1: 1 failed, 1 rejected"
