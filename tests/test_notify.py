"""Notifications in one process: made with their change of state, folded per target and window,
sent through a real SMTP server (aiosmtpd, STARTTLS and a login) and a real webhook receiver."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from spoold.core.config import (
    CallbackSettings,
    MailSettings,
    NotifySettings,
    NotifyTarget,
)
from spoold.core.errors import CallbackError, NotifyError
from spoold.core.job import JobStatus
from spoold.core.secrets import Masker, SecretStore
from spoold.core.spool import Spool
from spoold.core.spool.fs import LIST_EVERY, SETTLE
from spoold.core.states import JobState
from spoold.out.notices import Notices, log_tail
from spoold.out.notify import LOOK_SHARE, Notifier, send_mail
from spoold.out.outbox import Callbacks, CallbackTarget
from spoold.out.sender import Sender
from tests.fakes import FakeClock
from tests.harness import wait_for
from tests.loopback import free_port
from tests.receiver import Receiver
from tests.smtpd import MailServer, write_password

LOG = logging.getLogger("test")
WINDOW = 300.0
LINK = "https://spoold.example.net/jobs/"
TOKEN = "tok-9f8e7d6c5b4a"


@pytest.fixture
def mail_server(tmp_path: Path) -> Iterator[MailServer]:
    (tmp_path / "smtpd").mkdir()
    server = MailServer(tmp_path / "smtpd").start()
    yield server
    server.stop()


class Bed:
    """Callbacks and a Notifier over one spool, as the daemon wires them."""

    def __init__(
        self, spool: Spool, clock: FakeClock, tmp_path: Path, mail: MailSettings | None,
        *, wait: float = 0.0, host: str = "host1", **sending: Any,
    ) -> None:  # fmt: skip
        secrets_dir = tmp_path / "secrets"
        write_password(secrets_dir)
        self.spool, self.clock = spool, clock
        self.settings = NotifySettings(mail=mail, window=WINDOW, wait=wait)
        notices = Notices(self.settings, hostname=host, link=lambda job_id: LINK + job_id)
        self.callbacks = Callbacks(spool, clock, SecretStore(None), logger=LOG, host=host,
                                   notices=notices)  # fmt: skip
        self.folded: list[tuple[str, int]] = []
        self.notifier = Notifier(
            spool, self.callbacks, clock, settings=self.settings,
            sending=CallbackSettings(**{"timeout": 10.0, "initial": 5.0, **sending}),
            secrets=SecretStore(secrets_dir), logger=LOG, draw=lambda: 0.0,
            on_folded=lambda kind, n: self.folded.append((kind, n)),
        )  # fmt: skip

    def fail(
        self, job_id: str, targets: tuple[NotifyTarget, ...], *, log: str = "",
        event: str = "failed", masker: Masker | None = None,
    ) -> JobStatus:  # fmt: skip
        """A job in running/ that ends ``event`` (its log holding ``log``), announced."""
        path = self.spool.dir("running") / job_id
        path.mkdir()
        (path / "log").write_text(log)
        status = JobStatus(job_id=job_id, state=JobState.RUNNING, executor="local", type=None,
                           submitted_at="2026-11-22T12:00:00Z", source=None)  # fmt: skip
        (path / "status.json").write_text(json.dumps(status.to_dict()))
        status.begin_attempt(self.clock.now(), "w1")
        state = {"failed": JobState.FAILED, "succeeded": JobState.SUCCEEDED}[event]
        status.end_attempt(self.clock.now(), state, 3 if event == "failed" else 0,
                           f"exit code 3 ({TOKEN})" if event == "failed" else None)  # fmt: skip
        mask = None if masker is None else masker.mask_data
        with self.callbacks.announce(CallbackTarget(None, "", notify=targets), event, status,
                                     mask):  # fmt: skip
            (path / "status.json").write_text(json.dumps(status.to_dict()))
        return status

    def outbox(self, directory: str = "") -> list[str]:
        return self.spool.deliveries.names(directory)


def email(*to: str, on: tuple[str, ...] = ("failed",)) -> NotifyTarget:
    return NotifyTarget("email", to=to, on=frozenset(on))


def webhook(url: str, form: str = "json", on: tuple[str, ...] = ("failed",)) -> NotifyTarget:
    return NotifyTarget("webhook", url=url, format=form, on=frozenset(on))


def mail_settings(server: MailServer, port: int | None = None) -> MailSettings:
    return MailSettings(
        host="127.0.0.1", port=port or server.port, user="spoold-mailer",
        password_secret="smtp-password", sender="spoold@example.net", ca_file=server.ca_file,
    )  # fmt: skip


def test_a_failure_is_mailed_once_over_starttls_with_its_masked_log_tail(
    spool: Spool, clock: FakeClock, tmp_path: Path, mail_server: MailServer
) -> None:
    bed = Bed(spool, clock, tmp_path, mail_settings(mail_server))
    lines = [f"2026-11-22T12:00:00Z INFO line {n}" for n in range(200)]
    lines.append(f"2026-11-22T12:00:01Z ERROR token was {TOKEN}")
    masker = Masker([TOKEN])
    bed.fail("backup-7", (email("ops@example.net"),), log="\n".join(lines) + "\n", masker=masker)
    assert bed.outbox() == ["_n.backup-7~00000001.json"], "made with the change"
    assert bed.notifier.tick(inline=True) == 1
    (got,) = mail_server.wait_count(1)
    assert got.tls and got.login == "spoold-mailer", "STARTTLS, then the login"
    assert got.recipients == ["ops@example.net"] and got.sender == "spoold@example.net"
    message = got.message()
    assert message["Subject"] == "[spoold] job backup-7 failed on host1"
    text = got.text()
    assert "Error: exit code 3 (***)" in text and TOKEN not in text
    assert f"Page: {LINK}backup-7" in text
    tail = got.attachments()["log-tail.txt"]
    assert "line 199" in tail and "line 151" in tail and "line 150" not in tail, "50 lines"
    assert "token was ***" in tail and TOKEN not in got.content.decode(errors="replace")
    # Sent: nothing is held, the window is open; nothing is sent again.
    assert [n for n in bed.outbox() if not n.startswith("_w.")] == []
    assert bed.notifier.tick(inline=True) == 0
    assert len(mail_server.mails()) == 1 and bed.folded == []


def test_a_log_tails_masking_spares_spoolds_stamps_and_levels() -> None:
    """A careless submitter's secret ``2``: the tail was masked again as one text, and every
    line's stamp came out ``***026-11-***...``; the log itself is masked before its stamps are
    added. Each line's text is masked; a line not in the log's form, wholly."""
    lines = [
        "2026-11-22T12:00:02.123456Z INFO code 2 here",
        "2026-11-22T12:00:02Z ERROR spoold: exit 2",
        "ragged 2 line",
        "2026-11-22T12:00:02Z INFO ",
    ]
    data = ("\n".join(lines) + "\n").encode()
    tail = log_tail(io.BytesIO(data), Masker(["2"]).mask_data).splitlines()
    assert tail == [
        "2026-11-22T12:00:02.123456Z INFO code *** here",
        "2026-11-22T12:00:02Z ERROR spoold: exit ***",
        "ragged *** line",
        "2026-11-22T12:00:02Z INFO ",
    ], tail


def test_twenty_failures_together_are_one_digest(
    spool: Spool, clock: FakeClock, tmp_path: Path, mail_server: MailServer
) -> None:
    bed = Bed(spool, clock, tmp_path, mail_settings(mail_server))
    target = email("ops@example.net")
    for n in range(20):
        bed.fail(f"job-{n:02d}", (target,))
    assert bed.notifier.tick(inline=True) == 1
    (got,) = mail_server.wait_count(1)
    assert got.message()["Subject"] == "[spoold] 20 jobs on host1: 20 failed"
    text = got.text()
    for n in range(20):
        assert f"- job-{n:02d}: failed (exit code 3 (" in text
        assert f"{LINK}job-{n:02d}" in text
    assert bed.folded == [("email", 20)]


def test_a_quiet_targets_first_notice_waits_for_the_burst_it_starts(
    spool: Spool, clock: FakeClock, tmp_path: Path, receiver: Receiver
) -> None:
    """``wait``: the first failure of a burst is not sent alone, ahead of a digest of the
    rest; after the wait, one message holds all that came; alone, it goes alone."""
    bed = Bed(spool, clock, tmp_path, None, wait=10.0)
    target = webhook(receiver.url)
    bed.fail("first", (target,))
    assert bed.notifier.tick(inline=True) == 0, "it waits for others to join it"
    clock.advance(9)
    for n in range(5):
        bed.fail(f"more-{n}", (target,))
    assert bed.notifier.tick(inline=True) == 0
    clock.advance(1)
    assert bed.notifier.tick(inline=True) == 1
    (body,) = receiver.bodies()
    assert body["count"] == 6 and body["digest"] is True
    assert [n["job_id"] for n in body["notices"]] == ["first", *(f"more-{n}" for n in range(5))]
    # The window is open now; once it closed and a failure comes alone, it goes alone.
    clock.advance(WINDOW)
    bed.notifier.tick(inline=True)
    bed.fail("lone", (target,))
    clock.advance(10)
    assert bed.notifier.tick(inline=True) == 1
    assert receiver.bodies()[-1]["count"] == 1


def test_what_comes_while_the_window_is_open_waits_for_it_to_close(
    spool: Spool, clock: FakeClock, tmp_path: Path, receiver: Receiver
) -> None:
    bed = Bed(spool, clock, tmp_path, None)
    target = webhook(receiver.url)
    bed.fail("first", (target,))
    bed.notifier.tick(inline=True)
    assert [b["count"] for b in receiver.bodies()] == [1]
    clock.advance(10)
    bed.fail("second", (target,))
    bed.fail("third", (target,))
    assert bed.notifier.tick(inline=True) == 0, "the window is open"
    clock.advance(WINDOW - 11)
    assert bed.notifier.tick(inline=True) == 0
    # The daemon restarts meanwhile: the window and what it holds are in outbox/.
    bed = Bed(spool, clock, tmp_path, None)
    assert bed.notifier.tick(inline=True) == 0
    clock.advance(1)
    assert bed.notifier.tick(inline=True) == 1
    bodies = receiver.bodies()
    assert [b["count"] for b in bodies] == [1, 2]
    assert [n["job_id"] for n in bodies[1]["notices"]] == ["second", "third"]
    assert bodies[1]["digest"] is True and bed.folded == [("webhook", 2)]
    # Nothing came in the next window: it closes and is forgotten.
    clock.advance(WINDOW)
    bed.notifier.tick(inline=True)
    assert bed.outbox() == []


def test_targets_hear_only_the_events_they_asked_for(
    spool: Spool, clock: FakeClock, tmp_path: Path, receiver: Receiver
) -> None:
    bed = Bed(spool, clock, tmp_path, None)
    on_success = webhook(receiver.url + "/ok", on=("succeeded",))
    on_failure = webhook(receiver.url + "/ko")
    bed.fail("a", (on_success, on_failure), event="failed")
    bed.fail("b", (on_success, on_failure), event="succeeded")
    status = JobStatus(job_id="c", state=JobState.RUNNING, executor="local", type=None,
                       submitted_at="2026-11-22T12:00:00Z", source=None)  # fmt: skip
    with bed.callbacks.announce(CallbackTarget(None, "", notify=(on_failure,)), "started", status):
        pass
    assert status.callback_sequence == 0, "no target wants it: nothing prepared, no sequence"
    bed.notifier.tick(inline=True)
    got = {r.path: json.loads(r.body) for r in receiver.wait_count(2)}
    assert got["/hook/ok"]["notices"][0]["job_id"] == "b"
    assert got["/hook/ko"]["notices"][0]["job_id"] == "a"
    assert len(receiver.received) == 2


def test_a_change_that_is_not_made_notifies_no_one(
    spool: Spool, clock: FakeClock, tmp_path: Path, receiver: Receiver
) -> None:
    bed = Bed(spool, clock, tmp_path, None)
    status = JobStatus(job_id="j", state=JobState.FAILED, executor="local", type=None,
                       submitted_at="2026-11-22T12:00:00Z", source=None)  # fmt: skip
    target = CallbackTarget(None, "", notify=(webhook(receiver.url),))
    with (
        pytest.raises(OSError, match="disk full"),
        bed.callbacks.announce(target, "failed", status),
    ):
        assert bed.outbox() == ["_n.j~00000001.prepared"]
        raise OSError("disk full")
    assert bed.outbox() == [] and status.callback_sequence == 0


def test_a_prepared_notification_is_decided_by_the_jobs_status(
    spool: Spool, clock: FakeClock, tmp_path: Path
) -> None:
    """A crash between prepare and commit: the status.json the change wrote decides."""
    bed = Bed(spool, clock, tmp_path, None)
    target = CallbackTarget(None, "", notify=(webhook("http://127.0.0.1:9/x"),))
    left = []  # kept: a generator collected would be closed, and drop what it prepared
    for job_id, made in (("made", True), ("unmade", False)):
        path = spool.dir("running") / job_id
        path.mkdir()
        status = JobStatus(job_id=job_id, state=JobState.RUNNING, executor="local", type=None,
                           submitted_at="2026-11-22T12:00:00Z", source=None)  # fmt: skip
        (path / "status.json").write_text(json.dumps(status.to_dict()))
        left.append(bed.callbacks.announce(target, "failed", status))
        left[-1].__enter__()  # prepared; the process dies before it commits
        if made:
            (path / "status.json").write_text(json.dumps(status.to_dict()))
    assert sorted(bed.outbox()) == ["_n.made~00000001.prepared", "_n.unmade~00000001.prepared"]
    assert bed.callbacks.settle_all() == (1, 1)
    assert bed.outbox() == ["_n.made~00000001.json"]


def test_a_notice_of_a_change_not_made_is_dropped_though_its_job_ran_on(
    spool: Spool, clock: FakeClock, tmp_path: Path
) -> None:
    """host1 died as it ended job j (``failed``: its callback and a notice prepared, its
    status not written). Host b took the job over and requeued it (``retrying``: at that
    sequence, its callback replaced host1's; no notice for it), then ran it again
    (``started``). At its start, host1 decides the notice it left: the status's later
    sequence proves nothing of it, for the status names other changes. It was sent: a mail
    that j failed, which it never did."""
    bed = Bed(spool, clock, tmp_path, None)
    target = CallbackTarget("http://127.0.0.1:9/hook", "s3cret",
                            notify=(webhook("http://127.0.0.1:9/x"),))  # fmt: skip
    path = spool.dir("running") / "j"
    path.mkdir()
    status = JobStatus(job_id="j", state=JobState.FAILED, executor="local", type=None,
                       submitted_at="2026-11-22T12:00:00Z", source=None)  # fmt: skip
    (path / "status.json").write_text(json.dumps({**status.to_dict(), "state": "running"}))
    left = bed.callbacks.announce(target, "failed", status)
    left.__enter__()  # prepared; host1 dies before it writes the status
    assert bed.outbox() == ["_n.j~00000001.prepared", "j~00000001.prepared"]
    on_b = Callbacks(spool, clock, SecretStore(None), logger=LOG, host="b")
    taken = JobStatus.from_dict(json.loads((path / "status.json").read_text()))
    for event in ("retrying", "started"):
        with on_b.announce(target, event, taken):
            (path / "status.json").write_text(json.dumps(taken.to_dict()))
    assert bed.outbox() == ["_n.j~00000001.prepared", "j~00000001.json", "j~00000002.json"]
    assert bed.callbacks.settle_all() == (0, 1)
    assert bed.outbox() == ["j~00000001.json", "j~00000002.json"]


def test_a_mail_server_that_is_down_delays_no_one_else(
    spool: Spool, clock: FakeClock, tmp_path: Path, receiver: Receiver, mail_server: MailServer
) -> None:
    down = free_port()  # nothing listens there
    bed = Bed(spool, clock, tmp_path, mail_settings(mail_server, port=down), give_up_after=3600)
    bed.fail("j", (email("ops@example.net"), webhook(receiver.url)))
    assert bed.notifier.tick(inline=True) == 2
    assert receiver.wait_count(1)[0].path == "/hook", "the webhook went, the mail did not"
    (held,) = [n for n in bed.outbox() if n.startswith("_t.")]
    record = spool.deliveries.read(held)
    assert (
        record is not None
        and record["tries"] == 1
        and "Connection refused" in str(record["last_error"])
    )
    assert bed.notifier.tick(inline=True) == 0, "it waits out its backoff"
    clock.advance(5)
    assert bed.notifier.tick(inline=True) == 1
    clock.advance(3600)
    bed.notifier.tick(inline=True)
    assert bed.outbox("failed") == [held], "given up into outbox/failed/"
    assert mail_server.mails() == [] and len(receiver.received) == 1


def test_notices_held_through_an_outage_are_read_again_only_when_their_files_change(
    spool: Spool, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chat server down for a while leaves a notice held for each failed job, waiting out
    its backoff. Each tick (every second, and at each send's end) read every one of them:
    2000 held cost 39 ms of CPU a tick. A notice is read again only when its file changed."""
    down = webhook(f"http://127.0.0.1:{free_port()}/hook")  # nothing listens there
    bed = Bed(spool, clock, tmp_path, None, give_up_after=3600)
    for n in range(50):
        bed.fail(f"j{n:02d}", (down,))
    assert bed.notifier.tick(inline=True) == 1, "one digest, refused: each notice rewritten"
    held = [n for n in bed.outbox() if n.startswith("_t.")]
    assert len(held) == 50
    read = spool.deliveries.read
    looked: list[str] = []

    def counted(name: str, directory: str = "") -> dict[str, Any] | None:
        looked.append(name)
        return read(name, directory)

    monkeypatch.setattr(spool.deliveries, "read", counted)
    assert bed.notifier.tick(inline=True) == 0
    assert sorted(looked) == held, "each read once since its try rewrote it"
    looked.clear()
    for _ in range(20):
        clock.advance(0.1)
        assert bed.notifier.tick(inline=True) == 0
    assert looked == [], f"{len(looked)} notices read by 20 ticks with nothing changed"
    record = read(held[7])
    assert record is not None
    spool.deliveries.update(held[7], json.dumps({**record, "tries": 9}).encode())
    assert bed.notifier.tick(inline=True) == 0
    assert looked == [held[7]], "the one rewritten is read again"
    clock.advance(5)
    assert bed.notifier.tick(inline=True) == 1, "due: tried again, from what it holds"
    after = read(held[0])
    assert after is not None and after["tries"] == 10, "the tries of the one read again count"


class Looks:
    """Counts what the notifier's ticks list and stat in outbox/."""

    def __init__(self, spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
        self.listings = self.stats = 0
        names, stamp = spool.deliveries.names, spool.deliveries.stamp

        def listed(directory: str = "") -> list[str]:
            self.listings += 1
            return names(directory)

        def stamped(name: str) -> Any:
            self.stats += 1
            return stamp(name)

        monkeypatch.setattr(spool.deliveries, "names", listed)
        monkeypatch.setattr(spool.deliveries, "stamp", stamped)

    def clear(self) -> None:
        self.listings = self.stats = 0


def test_an_outbox_that_did_not_change_costs_a_tick_one_stat(
    spool: Spool, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chat server down for a while: each tick (every second, and at each send's end)
    stat'ed every notice held, 10,000 of them 78 ms of CPU a tick. Once outbox/'s own stamp
    has settled, a tick that finds it unchanged looks at nothing else (one tick in LIST_EVERY
    looks all the same); a change there is looked at by the next tick."""
    down = webhook(f"http://127.0.0.1:{free_port()}/hook")  # nothing listens there
    bed = Bed(spool, clock, tmp_path, None, give_up_after=3600, initial=60.0)
    for n in range(50):
        bed.fail(f"j{n:02d}", (down,))
    assert bed.notifier.tick(inline=True) == 1, "one digest, refused: each notice rewritten"
    looks = Looks(spool, monkeypatch)
    for _ in range(int(SETTLE) + 1):  # outbox/'s stamp seen unchanged for SETTLE seconds
        clock.advance(1.0)
        assert bed.notifier.tick(inline=True) == 0
    looks.clear()
    for _ in range(LIST_EVERY - 1):
        clock.advance(0.5)
        assert bed.notifier.tick(inline=True) == 0
    assert (looks.listings, looks.stats) == (0, 0), "nothing changed: nothing looked at"
    assert bed.notifier.tick(inline=True) == 0
    assert (looks.listings, looks.stats) == (1, 50), "the LIST_EVERY-th tick looks anyway"
    looks.clear()
    bed.fail("late", (down,))
    assert bed.notifier.tick(inline=True) == 0, "split and held: the backoff is not over"
    assert looks.listings >= 1, "a change: looked at by the next tick"
    held = [n for n in bed.outbox() if n.startswith("_t.")]
    assert len(held) == 51 and not [n for n in bed.outbox() if n.startswith("_n.")]
    for _ in range(int(SETTLE) + 1):
        clock.advance(1.0)
        assert bed.notifier.tick(inline=True) == 0
    looks.clear()
    record = spool.deliveries.read(held[0])
    assert record is not None and record["tries"] == 1
    clock.advance(record["next_try"] - clock.now().timestamp())
    assert bed.notifier.tick(inline=True) == 1, "due: handed out from the last look"
    assert looks.listings == 0
    record = spool.deliveries.read(held[0])
    assert record is not None and record["tries"] == 2


def test_a_host_whose_notices_were_left_to_it_is_looked_at_again_once_it_is_gone(
    spool: Spool, clock: FakeClock, tmp_path: Path, receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """outbox/ does not change when a host dies: the notices left to it are adopted at once
    all the same, though outbox/'s stamp has settled."""
    Bed(spool, clock, tmp_path, None, host="a").fail("j", (webhook(receiver.url),))
    b = Bed(spool, clock, tmp_path, None, host="b")
    b.notifier.host_state = lambda host: "alive"
    for _ in range(int(SETTLE) + 2):
        clock.advance(1.0)
        assert b.notifier.tick(inline=True) == 0, "a is alive: a sends it"
    looks = Looks(spool, monkeypatch)
    assert b.notifier.tick(inline=True) == 0
    assert looks.listings == 0, "settled: not looked at"
    b.notifier.host_state = lambda host: "stale"
    assert b.notifier.tick(inline=True) == 1, "adopted and sent at the next tick"
    assert [body["notices"][0]["job_id"] for body in receiver.bodies()] == ["j"]


def test_a_webhook_that_cannot_be_reached_never_shows_its_url_path(
    spool: Spool, clock: FakeClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A chat webhook's path is its key: the error kept and logged names the host alone."""
    key = "services/T0001/B0002/k3y-of-the-hook"
    url = f"http://127.0.0.1:{free_port()}/{key}"  # nothing listens there
    bed = Bed(spool, clock, tmp_path, None)
    bed.fail("j", (webhook(url, "slack"),))
    with caplog.at_level(logging.DEBUG, logger=LOG.name):
        assert bed.notifier.tick(inline=True) == 1
    (held,) = [n for n in bed.outbox() if n.startswith("_t.")]
    record = spool.deliveries.read(held)
    assert record is not None and record["tries"] == 1
    assert "127.0.0.1" in str(record["last_error"]) and "k3y" not in str(record["last_error"])
    assert caplog.records and all("k3y" not in r.getMessage() for r in caplog.records)


def test_another_hosts_notifications_are_its_own_while_it_lives_then_adopted(
    spool: Spool, clock: FakeClock, tmp_path: Path, receiver: Receiver
) -> None:
    """Hosts sharing a spool: a live host's notification is left to it; once it is gone,
    another host adopts it (as callbacks) and sends it, once."""
    target = webhook(receiver.url)
    Bed(spool, clock, tmp_path, None, host="a").fail("j", (target,))
    b = Bed(spool, clock, tmp_path, None, host="b")
    b.notifier.host_state = lambda host: "alive"
    assert b.notifier.tick(inline=True) == 0, "a is alive: a sends it"
    assert [n for n in b.outbox() if n.startswith("_n.")], "nor split by b"
    b.notifier.host_state = lambda host: "stale"
    assert b.notifier.tick(inline=True) == 1
    (body,) = receiver.bodies()
    assert body["notices"][0]["job_id"] == "j"
    assert [n for n in b.outbox() if not n.startswith("_w.b.")] == [], "sent, nothing held"
    c = Bed(spool, clock, tmp_path, None, host="c")
    c.notifier.host_state = lambda host: "stale"
    c.notifier.tick(inline=True)
    assert len(receiver.bodies()) == 1, "sent once"


def test_callbacks_and_notifications_go_their_own_ways(
    spool: Spool, clock: FakeClock, tmp_path: Path, receiver: Receiver
) -> None:
    """One change, one sequence: its callback and its notification file, each sent by its own."""
    bed = Bed(spool, clock, tmp_path, None)
    status = JobStatus(job_id="j", state=JobState.FAILED, executor="local", type=None,
                       submitted_at="2026-11-22T12:00:00Z", source=None)  # fmt: skip
    target = CallbackTarget(receiver.url + "/cb", "secret", notify=(webhook(receiver.url),))
    with bed.callbacks.announce(target, "failed", status):
        pass
    assert bed.outbox() == ["_n.j~00000001.json", "j~00000001.json"]
    callback = spool.deliveries.read("j~00000001.json")
    assert callback is not None and callback["delivery_id"] == status.callback_delivery
    sender = Sender(spool, bed.callbacks, clock, CallbackSettings(), LOG)
    assert sender.tick() == 1, "the callback sender takes the callback, not the notification"
    sender.start()
    try:
        receiver.wait_count(1)
    finally:
        sender.stop()
    bed.notifier.tick(inline=True)
    paths = sorted(r.path for r in receiver.wait_count(2))
    assert paths == ["/hook", "/hook/cb"]


def test_a_job_whose_targets_no_longer_work_keeps_its_callback(
    spool: Spool, clock: FakeClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Accepted with a mail server that the config no longer names: its callback still goes."""
    bed = Bed(spool, clock, tmp_path, None)
    document = {"callback": {"url": "http://127.0.0.1:9/cb", "secret": "s"},
                "notify": [{"email": {"to": ["ops@example.net"]}}]}  # fmt: skip
    with pytest.raises(CallbackError, match="email targets need a mail server"):
        bed.callbacks.target(document)  # what intake refuses
    found = bed.callbacks.target_of("j", document)
    assert found is not None and found.url == "http://127.0.0.1:9/cb" and found.notify == ()
    assert "job j sends no notifications: notify: email targets need" in caplog.text


def test_a_watched_outbox_wakes_the_notifier_for_a_change_file_and_it_rests_between(
    spool: Spool, clock: FakeClock, tmp_path: Path, receiver: Receiver
) -> None:
    """The notifier looked at outbox/ every second (5.5 ms of CPU in 30 s idle), and a failure
    a worker process committed waited for that look. With outbox/ watched: a change file told
    by name is looked for at once; nothing of the notifier's there, it waits ``rest``."""
    bed = Bed(spool, clock, tmp_path, None)
    notifier = bed.notifier
    notifier.pace(1.0, 30.0)
    assert notifier._wait() == 0.0, "a look is owed: what came before the watch"
    notifier.tick(inline=True)
    assert notifier._wait() == 30.0
    notifier.changed("_t.0a1b2c3d.first~00000001.json")  # a held notice: the notifier's own
    notifier.changed("job~00000001.json")  # a callback delivery: the sender's
    assert notifier._wait() == 30.0
    bed.fail("first", (webhook(receiver.url),))
    notifier.changed("_n.first~00000001.json")
    assert notifier._wait() == 0.0
    assert notifier.tick(inline=True) == 1
    assert [b["count"] for b in receiver.bodies()] == [1]
    assert notifier._wait() == 1.0, "its window is open in outbox/: polled"
    notifier.pace(1.0, None)
    assert notifier._wait() == 0.0
    notifier.tick(inline=True)
    clock.advance(WINDOW)
    notifier.tick(inline=True)  # the window closed with nothing held: removed
    notifier.tick(inline=True)
    assert not bed.outbox() and notifier._wait() == 1.0, "not watched: a poll"


def test_a_change_told_right_after_a_listing_is_waited_for_in_proportion_to_it(
    spool: Spool, clock: FakeClock, tmp_path: Path
) -> None:
    """Each change file told would list outbox/ again: with thousands of notices held (a
    chat server down) and failures coming fast, the notifier's thread would do nothing
    else. The loop waits LOOK_SHARE times the last listing's time before a told look (and
    before any tick: see the next test)."""
    bed = Bed(spool, clock, tmp_path, None)
    port = free_port()  # nothing listens: held
    target = webhook(f"http://127.0.0.1:{port}/hook")
    bed.notifier.pace(1.0, 30.0)
    names = spool.deliveries.names

    def slow(directory: str = "") -> list[str]:
        clock.advance(0.01)  # a listing of a backlog takes 10 ms
        return names(directory)

    setattr(spool.deliveries, "names", slow)  # noqa: B010 - a spy on the instance
    bed.notifier.tick(inline=True)
    bed.fail("next", (target,))
    bed.notifier.changed("_n.next~00000001.json")
    assert bed.notifier._wait() == pytest.approx(LOOK_SHARE * 0.01)
    clock.advance(LOOK_SHARE * 0.01)
    assert bed.notifier._wait() == 0.0
    bed.notifier.tick(inline=True)
    assert any(n.startswith("_t.") for n in bed.outbox()), "split into its held notice"


def test_the_notifiers_loop_lists_a_backlog_a_tenth_of_its_time_at_most(
    spool: Spool, clock: FakeClock, tmp_path: Path
) -> None:
    """However fast the wake-ups come (a change file committed, a send ended), the loop's
    next tick waits LOOK_SHARE times the last listing's time: each tick lists where
    outbox/'s stamp moved, and failures coming fast kept it listing, a tenth of its time
    only in the README. The clock stands still here: only the loop's own wait holds it."""
    bed = Bed(spool, clock, tmp_path, None)
    target = webhook(f"http://127.0.0.1:{free_port()}/hook")  # nothing listens: held
    names, tick = spool.deliveries.names, bed.notifier.tick
    ticks: list[float] = []

    def slow(directory: str = "") -> list[str]:
        clock.advance(0.01)  # a listing of a backlog takes 10 ms
        return names(directory)

    def counted(*, inline: bool = False) -> int:
        ticks.append(clock.monotonic())
        return tick(inline=inline)

    setattr(spool.deliveries, "names", slow)  # noqa: B010 - a spy on the instance
    setattr(bed.notifier, "tick", counted)  # noqa: B010
    bed.notifier.start()
    try:
        wait_for(lambda: ticks, what="the first tick")
        assert bed.notifier.held_back() == pytest.approx(LOOK_SHARE * 0.01)
        for n in range(5):  # committed and told, each waking the loop
            bed.fail(f"fast{n}", (target,))
            bed.notifier.changed(f"_n.fast{n}~00000001.json")
            time.sleep(0.05)
        assert len(ticks) == 1, "held back while the clock stood still"
        clock.advance(LOOK_SHARE * 0.01)
        wait_for(lambda: len(ticks) > 1, what="the tick once listing is free")
    finally:
        bed.notifier.stop()


def test_a_window_the_callback_sender_meets_half_written_is_left_to_its_writer(
    spool: Spool, clock: FakeClock, tmp_path: Path, receiver: Receiver,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A target's window is prepared, then committed, by the notifier. The callback sender,
    looking between the two, took it for a delivery its writer had left unfinished (it had no
    ``created``): "its writer left it unfinished; the change was not made, dropped", with
    every window (11 times in a probe's afternoon)."""
    bed = Bed(spool, clock, tmp_path, None)
    sender = Sender(spool, bed.callbacks, clock, CallbackSettings(), LOG)
    commit = spool.deliveries.commit
    looked: list[int] = []

    def sender_looks_first(prepared: str, data: bytes) -> Any:
        sender.changed(None)  # as outbox/'s watch tells it: look at all of it
        looked.append(sender.tick())
        return commit(prepared, data)

    monkeypatch.setattr(spool.deliveries, "commit", sender_looks_first)
    bed.fail("w", (webhook(receiver.url),))
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert bed.notifier.tick(inline=True) == 1
    assert looked, "the sender looked while a record was prepared"
    assert not [r for r in caplog.records if "left it unfinished" in r.getMessage()]
    assert any(name.startswith("_w.host1.") for name in bed.outbox()), "the window is kept"


def test_a_change_split_again_after_a_crash_keeps_its_notices_message_id(
    spool: Spool, clock: FakeClock, tmp_path: Path, mail_server: MailServer
) -> None:
    """A crash between splitting a change file and removing it splits it again at the next
    look: the same held notice, under the same name and with the same id, which the mail
    carries as its Message-ID (a mail sent twice is known as one by its reader)."""
    bed = Bed(spool, clock, tmp_path, mail_settings(mail_server), wait=10.0)
    bed.fail("backup-7", (email("ops@example.net"),))
    change = spool.dir("outbox") / "_n.backup-7~00000001.json"
    left = change.read_bytes()
    assert bed.notifier.tick(inline=True) == 0, "split, and waiting for others to join it"
    (held,) = [n for n in bed.outbox() if n.startswith("_t.")]
    first = spool.deliveries.read(held)
    assert first is not None and not change.exists()
    change.write_bytes(left)  # as the crash left it: not removed yet
    bed = Bed(spool, clock, tmp_path, mail_settings(mail_server), wait=10.0)  # restarted
    assert bed.notifier.tick(inline=True) == 0
    assert [n for n in bed.outbox() if n.startswith(("_t.", "_n."))] == [held]
    again = spool.deliveries.read(held)
    assert again is not None and again["delivery_id"] == first["delivery_id"]
    clock.advance(10)
    assert bed.notifier.tick(inline=True) == 1
    (got,) = mail_server.wait_count(1)
    assert got.message()["Message-ID"] == f"<{first['delivery_id']}@spoold>"


def test_a_webhooks_redirect_is_not_followed_nor_taken(
    spool: Spool, clock: FakeClock, tmp_path: Path, receiver: Receiver
) -> None:
    """Only a 2xx answer takes a notice: a 307 (which keeps the method and the body) is not
    followed to where it points, and the notice stays held for its next try."""
    elsewhere = Receiver().start()
    try:
        receiver.status, receiver.location = 307, elsewhere.url
        bed = Bed(spool, clock, tmp_path, None)
        bed.fail("j", (webhook(receiver.url),))
        assert bed.notifier.tick(inline=True) == 1
        assert len(receiver.received) == 1 and elsewhere.received == []
        (held,) = [n for n in bed.outbox() if n.startswith("_t.")]
        record = spool.deliveries.read(held)
        assert record is not None and record["tries"] == 1
        assert record["last_error"] == "OSError: HTTP 307"
        assert not [n for n in bed.outbox() if n.startswith("_w.")], "nothing sent: no window"
    finally:
        elsewhere.stop()


def test_a_notice_is_given_up_once_give_up_after_has_passed(
    spool: Spool, clock: FakeClock, tmp_path: Path
) -> None:
    """``callbacks.give_up_after`` from the notice's making: a try that fails that long after
    it moves it into outbox/failed/ (as a callback's), not one try later."""
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    bed = Bed(spool, clock, tmp_path, None, give_up_after=3600.0)
    bed.fail("j", (webhook(url),))
    assert bed.notifier.tick(inline=True) == 1
    (held,) = [n for n in bed.outbox() if n.startswith("_t.")]
    clock.advance(3600)
    assert bed.notifier.tick(inline=True) == 1
    assert bed.outbox("failed") == [held] and held not in bed.outbox()


@pytest.mark.parametrize("giving_up", [False, True], ids=["tried-again", "given-up"])
def test_a_notice_removed_by_hand_during_a_failing_send_stays_removed(
    spool: Spool, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    giving_up: bool,
) -> None:  # fmt: skip
    """A held notice deleted from outbox/ while a send of it is under way, which then fails:
    it is not written back (to be sent again) nor put into outbox/failed/."""
    url = f"http://127.0.0.1:{free_port()}/hook"
    bed = Bed(spool, clock, tmp_path, None, give_up_after=3600.0)
    bed.fail("j", (webhook(url),))
    assert bed.notifier.tick(inline=True) == 1  # nothing listens: held, to be sent again
    held = [n for n in bed.outbox() if n.startswith("_t.")]
    assert held
    clock.advance(3600 if giving_up else 60)

    def removed_then_refused(target: NotifyTarget, items: list[dict[str, Any]]) -> None:
        for name in held:
            (spool.dir("outbox") / name).unlink()  # rm, while the send waits
        raise OSError("HTTP 503")

    monkeypatch.setattr(bed.notifier, "_post", removed_then_refused)
    assert bed.notifier.tick(inline=True) == 1
    assert not set(held) & set(bed.outbox()), "written back"
    assert bed.outbox("failed") == []


def test_at_most_per_host_sends_go_to_one_server_at_once(
    spool: Spool, clock: FakeClock, tmp_path: Path
) -> None:
    """``callbacks.per_host``: two targets on one server (two chat channels) are sent one at
    a time there; a target on another server is not held by them. The notifier's threads are
    not started: what a tick hands out stays in flight."""
    one, other = free_port(), free_port()
    targets = (webhook(f"http://127.0.0.1:{one}/a"), webhook(f"http://127.0.0.1:{one}/b"),
               webhook(f"http://127.0.0.1:{other}/c"))  # fmt: skip
    bed = Bed(spool, clock, tmp_path, None, per_host=1)
    bed.fail("j", targets)
    assert bed.notifier.tick() == 2, "one to each server"
    assert bed.notifier.tick() == 0, "the second target of the first server waits its turn"


def test_a_window_survives_a_crash_right_after_its_send(
    spool: Spool, clock: FakeClock, tmp_path: Path, receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A send's window is written before its notices are removed: a crash between the two
    leaves the notice held (sent again, as a lost answer is) but the window open, so the
    restarted daemon holds it until the window closes rather than send it again at once."""

    class Crash(BaseException):
        pass

    remove = spool.deliveries.remove

    def crash(name: str) -> None:
        if name.startswith("_t."):  # a sent notice: the process dies here
            raise Crash(name)
        remove(name)

    bed = Bed(spool, clock, tmp_path, None)
    bed.fail("j", (webhook(receiver.url),))
    monkeypatch.setattr(spool.deliveries, "remove", crash)
    with pytest.raises(Crash):
        bed.notifier.tick(inline=True)
    monkeypatch.undo()
    assert len(receiver.received) == 1
    bed = Bed(spool, clock, tmp_path, None)  # restarted
    assert any(n.startswith("_w.host1.") for n in bed.outbox()), "the window was kept"
    assert bed.notifier.tick(inline=True) == 0, "the window is open: held"
    clock.advance(WINDOW)
    assert bed.notifier.tick(inline=True) == 1
    assert len(receiver.wait_count(2)) == 2


def test_no_login_is_sent_in_clear_whatever_the_settings(tmp_path: Path) -> None:
    """The config refuses a login with ``security: none``; settings made otherwise (an API,
    a config check missed) still never send the password in clear, to a server that would
    take it."""
    (tmp_path / "smtpd").mkdir()
    server = MailServer(tmp_path / "smtpd", plain=True).start()
    try:
        write_password(tmp_path / "secrets")
        settings = MailSettings(host="127.0.0.1", port=server.port, security="none",
                                user="spoold-mailer", password_secret="smtp-password")  # fmt: skip
        message = EmailMessage()
        message["Subject"] = "x"
        message.set_content("x")
        with pytest.raises(NotifyError, match="no login without TLS"):
            send_mail(
                settings, message, ["ops@example.net"], SecretStore(tmp_path / "secrets"), 5.0
            )
        assert server.logins == [] and server.mails() == []
        # The same server takes a mail with no login: it was the login alone that was refused.
        send_mail(settings._replace(user=None, password_secret=None), message,
                  ["ops@example.net"], SecretStore(None), 5.0)  # fmt: skip
        assert len(server.mails()) == 1
    finally:
        server.stop()
