"""Notifications end to end: the real daemon mailing through a real SMTP server on loopback
(aiosmtpd, STARTTLS and a login) and posting to a real webhook receiver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.apiclient import free_port, make_token
from tests.harness import (
    StartDaemon,
    daemon_starter,
    drop,
    job_state,
    local_job,
    wait_finished,
    wait_for,
    wait_rejected,
)
from tests.receiver import Receiver
from tests.smtpd import MailServer, write_password

pytestmark = pytest.mark.daemon

SECRET = "s3cr3t-the-mail-must-not-show"
OPS = "ops@example.net"


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "secrets"
    write_password(directory)
    (directory / "api_token").write_text(SECRET + "\n")
    (directory / "api_token").chmod(0o600)
    return directory


@pytest.fixture
def mail_server(tmp_path: Path) -> Iterator[MailServer]:
    (tmp_path / "smtpd").mkdir()
    server = MailServer(tmp_path / "smtpd")
    yield server
    server.stop()


@pytest.fixture
def start_daemon(
    spool_dir: Path, tmp_path: Path, secrets_dir: Path, mail_server: MailServer
) -> Iterator[StartDaemon]:
    """Start a daemon with the mail server and secrets configured, plus ``overrides``."""
    yield from daemon_starter(
        spool_dir, tmp_path / "config.yaml", secrets_dir=str(secrets_dir),
        mail=mail_server.mail_config(), callbacks={"backoff": {"initial": "200ms", "max": "1s"}},
        notify_wait="0s",
    )  # fmt: skip


def failing(job_id: str, **fields: Any) -> dict[str, Any]:
    """A job that prints the secret (the log masks it), some lines, then fails with 3."""
    commands = ["seq 1 120", 'echo "token is ${secret:api_token}"', "exit 3"]
    return local_job(job_id, commands, **fields)


def outbox_notifications(spool: Path) -> list[str]:
    return sorted(p.name for p in (spool / "outbox").iterdir() if p.name.startswith("_"))


def test_a_failing_job_mails_once_with_its_masked_log_tail(
    start_daemon: StartDaemon, spool_dir: Path, mail_server: MailServer
) -> None:
    mail_server.start()
    api = {"listen": f"127.0.0.1:{free_port()}", "public_url": "https://spoold.test"}
    daemon = start_daemon(notify=[{"email": {"to": [OPS]}}], notify_window="1h", api=api)
    drop(spool_dir, "broken.yaml", failing("broken"))
    assert wait_finished(spool_dir, "broken")[0] == "failed"
    (got,) = mail_server.wait_count(1)
    message = got.message()
    assert message["Subject"].startswith("[spoold] job broken failed on ")
    text = got.text()
    assert "Error: " in text and "Exit code: 3" in text
    assert "Page: https://spoold.test/jobs/broken" in text
    tail = got.attachments()["log-tail.txt"]
    assert "token is ***" in tail and "120" in tail
    assert SECRET not in got.content.decode(errors="replace")
    assert got.tls and got.login == "spoold-mailer"
    # A second failure of another job comes while the window is open: held, not mailed.
    drop(spool_dir, "second.yaml", failing("second"))
    wait_finished(spool_dir, "second")
    wait_for(lambda: any(n.startswith("_t.") for n in outbox_notifications(spool_dir)),
             what="the second failure held")  # fmt: skip
    daemon.stop()
    assert len(mail_server.mails()) == 1


def test_twenty_jobs_failing_together_give_one_digest(
    start_daemon: StartDaemon, spool_dir: Path, mail_server: MailServer, tmp_path: Path
) -> None:
    """Twenty jobs failing at once: one message, a digest of all twenty, nothing before it
    (the first waits ``notify_wait`` for the others to join it)."""
    mail_server.start()
    gate = tmp_path / "gate"
    port = free_port()
    start_daemon(workers=20, notify=[{"email": {"to": [OPS]}}], notify_window="1h",
                 notify_wait="5s", api={"listen": f"127.0.0.1:{port}"})  # fmt: skip
    waiting = f"for i in $(seq 1 600); do test -e {gate} && exit 4; sleep 0.1; done; exit 5"
    for n in range(20):
        drop(spool_dir, f"many-{n:02d}.yaml", local_job(f"many-{n:02d}", waiting))

    def all_running() -> bool:
        return all((job_state(spool_dir, f"many-{n:02d}") or ("",))[0] == "running"
                   for n in range(20))  # fmt: skip

    wait_for(all_running, what="the twenty jobs running")
    gate.touch()  # the twenty fail now, together
    for n in range(20):
        assert wait_finished(spool_dir, f"many-{n:02d}")[0] == "failed"
    (digest,) = mail_server.wait_count(1)
    assert digest.message()["Subject"].startswith("[spoold] 20 jobs on ")
    assert digest.message()["Subject"].endswith(": 20 failed")
    text = digest.text()
    for n in range(20):
        assert f"- many-{n:02d}: failed" in text
    wait_for(lambda: "folded into one digest" in start_daemon_log(spool_dir), what="logged")
    metrics = _metrics(spool_dir, port)
    assert 'spoold_notifications_folded_total{kind="email"} 20.0' in metrics
    assert len(mail_server.mails()) == 1


def start_daemon_log(spool: Path) -> str:
    return (spool.parent / "daemon.log").read_text(errors="replace")


def _metrics(spool: Path, port: int) -> str:
    """GET /metrics with a read token made for the test."""
    token = make_token(spool, "scrape", "read")
    answer = requests.get(f"http://127.0.0.1:{port}/metrics",
                          headers={"Authorization": f"Bearer {token}"}, timeout=10)  # fmt: skip
    assert answer.status_code == 200, answer.text
    return answer.text


def test_a_mail_server_down_through_a_crash_still_gets_exactly_one_message(
    start_daemon: StartDaemon, spool_dir: Path, mail_server: MailServer
) -> None:
    daemon = start_daemon(notify=[{"email": {"to": [OPS]}}])
    drop(spool_dir, "lost.yaml", failing("lost"))
    wait_finished(spool_dir, "lost")

    def tried() -> bool:
        return "notify mail to ops@example.net failed" in daemon.log()

    wait_for(tried, what="a failed try at the mail server")
    daemon.kill()  # kill -9, with the notice held in outbox/
    assert any(n.startswith("_t.") for n in outbox_notifications(spool_dir))
    mail_server.start()
    start_daemon(notify=[{"email": {"to": [OPS]}}])
    (got,) = mail_server.wait_count(1)
    assert "job lost failed" in got.message()["Subject"]
    wait_for(lambda: not any(n.startswith(("_t.", "_n.")) for n in outbox_notifications(spool_dir)),
             what="the notice removed once sent")  # fmt: skip
    assert len(mail_server.mails()) == 1


def test_each_chat_format_gets_its_own_shape_and_on_filters(
    start_daemon: StartDaemon, spool_dir: Path, receiver: Receiver
) -> None:
    url = receiver.url
    default = {"webhook": {"url": url + "/default"}, "on": ["succeeded", "rejected"]}
    start_daemon(notify=[default], notify_window="1s")
    job = failing("chatty", notify=[
        {"webhook": {"url": url + "/slack", "format": "slack"}},
        {"webhook": {"url": url + "/mattermost", "format": "mattermost"}},
        {"webhook": {"url": url + "/teams", "format": "teams"}},
        {"webhook": {"url": url + "/json", "format": "json"}, "on": ["failed"]},
        {"webhook": {"url": url + "/never"}, "on": ["succeeded"]},
    ])  # fmt: skip
    drop(spool_dir, "chatty.yaml", job)
    shapes = {f"/hook/{name}" for name in ("slack", "mattermost", "teams", "json")}
    # By path, not by count: a send whose answer came late may come again (a retry).
    wait_for(lambda: shapes <= {r.path for r in receiver.received}, what="the four shapes")
    got = {r.path: r.json() for r in receiver.received}
    slack = got["/hook/slack"]
    assert slack["text"].startswith("job chatty failed on ")
    assert [b["type"] for b in slack["blocks"]] == ["header", "section", "section"]
    assert "token is ***" in slack["blocks"][2]["text"]["text"]
    mattermost = got["/hook/mattermost"]
    assert (
        mattermost["text"].startswith("#### job chatty failed on ") and "```" in mattermost["text"]
    )
    teams = got["/hook/teams"]
    assert teams["@type"] == "MessageCard" and teams["title"].startswith("job chatty failed")
    assert {"name": "Job", "value": "chatty"} in teams["sections"][0]["facts"]
    plain = got["/hook/json"]
    assert plain["type"] == "spoold.notification" and plain["count"] == 1
    (notice,) = plain["notices"]
    assert (notice["job_id"], notice["event"], notice["state"], notice["exit_code"]) == (
        "chatty", "failed", "failed", 3,
    )  # fmt: skip
    assert SECRET not in str(got)
    # The config's default (succeeded, rejected) for a job with no notify: of its own.
    drop(spool_dir, "fine.yaml", local_job("fine", "true"))
    drop(spool_dir, "bad.yaml", "executor: [not, valid\n")
    wait_rejected(spool_dir, "bad.yaml")

    def defaults() -> list[str] | None:
        # One message each, or one digest of both: as the window decides.
        bodies = [r.json() for r in list(receiver.received) if r.path == "/hook/default"]
        events = sorted(n["event"] for body in bodies for n in body["notices"])
        return events if len(events) >= 2 else None

    assert wait_for(defaults, what="the defaults' notifications") == ["rejected", "succeeded"]
    assert not any(r.path == "/hook/never" for r in receiver.received)
