"""Callbacks in one process: deliveries made with their state change, signed, sent in order."""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import requests
from requests.structures import CaseInsensitiveDict

from spoold.core.config import load_config
from spoold.core.errors import CallbackError, ConfigError, JobBusy
from spoold.core.job import JobStatus
from spoold.core.secrets import SecretStore
from spoold.core.spool import Spool
from spoold.core.spool.fs import LIST_EVERY, SETTLE
from spoold.core.states import JobState
from spoold.intake.incoming import Accepted, Rejected
from spoold.out.outbox import STALE_PREPARED, Callbacks, CallbackTarget
from spoold.out.sender import CallbackSettings, Sender
from spoold.run.control import JobControl
from tests.fakes import FakeClock
from tests.harness import intake_for, run_cli, wait_for
from tests.loopback import free_port
from tests.receiver import Receiver, verify

LOG = logging.getLogger("test")
SECRET = "s3cr3t-for-tests"


def callbacks(spool: Spool, clock: FakeClock, secrets: SecretStore | None = None) -> Callbacks:
    return Callbacks(spool, clock, secrets or SecretStore(None), logger=LOG)


def sender(spool: Spool, clock: FakeClock, **settings: Any) -> Sender:
    return Sender(
        spool, callbacks(spool, clock), clock, CallbackSettings(**settings), LOG, draw=lambda: 0.0
    )


def status(job_id: str, state: JobState = JobState.PENDING, sequence: int = 0) -> JobStatus:
    return JobStatus(
        job_id=job_id, state=state, executor="local", type=None,
        submitted_at="2026-11-22T12:00:00Z", source=None, callback_sequence=sequence,
    )  # fmt: skip


def put_job(spool: Spool, directory: str, job_id: str, sequence: int) -> None:
    """A job as the spool would hold it, with the sequence its status.json records."""
    path = spool.dir(directory) / job_id
    path.mkdir()
    (path / "status.json").write_text(json.dumps(status(job_id, sequence=sequence).to_dict()))


def emit(
    spool: Spool, clock: FakeClock, target: CallbackTarget, job: JobStatus, event: str
) -> None:
    with callbacks(spool, clock).announce(target, event, job):
        pass


def readme_verify(secret: bytes, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """The receiver's check exactly as the README shows it, run here."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = readme.split("Verifying in Python:\n\n```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    result = namespace["verify"](secret, headers, body)
    assert isinstance(result, dict)
    return result


def outbox(spool: Spool, directory: str = "") -> list[str]:
    return spool.deliveries.names(directory)


def count_listings(spool: Spool) -> list[str]:
    """From now on, each listing of outbox/ (its subdirectory: "" for outbox/ itself)."""
    listings: list[str] = []
    names = spool.deliveries.names

    def counted(directory: str = "") -> list[str]:
        listings.append(directory)
        return names(directory)

    setattr(spool.deliveries, "names", counted)  # noqa: B010 - a spy on the instance
    return listings


def deliver_all(sender: Sender, spool: Spool) -> list[bool]:
    """Every delivery due, in the order the sender hands them out, tried once each."""
    results = []
    for name in outbox(spool):
        record = spool.deliveries.read(name)
        assert record is not None
        results.append(sender.deliver(name, record))
    return results


def test_a_delivery_is_signed_and_says_what_happened(
    spool: Spool, clock: FakeClock, receiver: Receiver
) -> None:
    job = status("j1")
    job.begin_attempt(clock.now(), "w1")
    job.end_attempt(clock.now(), JobState.SUCCEEDED, 0, None)
    job.result = {"vmid": 4711}
    emit(spool, clock, CallbackTarget(receiver.url, SECRET), job, "succeeded")
    assert outbox(spool) == ["j1~00000001.json"]
    assert job.callback_sequence == 1
    assert deliver_all(sender(spool, clock), spool) == [True]
    (got,) = receiver.wait_count(1)
    body = verify(got, SECRET)
    assert readme_verify(SECRET.encode(), CaseInsensitiveDict(got.headers), got.body) == body
    with pytest.raises(PermissionError):
        readme_verify(b"another secret", CaseInsensitiveDict(got.headers), got.body)
    assert {"event", "job_id", "state", "attempt", "exit_code", "error", "artifacts", "result",
            "timestamp", "delivery_id", "sequence"} <= body.keys()  # fmt: skip
    assert (body["event"], body["state"], body["attempt"], body["exit_code"]) == (
        "succeeded", "succeeded", 1, 0,
    )  # fmt: skip
    assert body["result"] == {"vmid": 4711} and body["sequence"] == 1
    assert got.headers["x-spoold-delivery"] == body["delivery_id"]
    assert got.headers["x-spoold-event"] == "succeeded"
    assert outbox(spool) == []


def test_a_change_that_is_not_made_sends_nothing(spool: Spool, clock: FakeClock) -> None:
    job = status("j1", sequence=3)
    target = CallbackTarget("http://x", SECRET)
    with (
        pytest.raises(OSError, match="disk full"),
        callbacks(spool, clock).announce(target, "failed", job),
    ):
        assert job.callback_sequence == 4
        raise OSError("disk full")
    assert job.callback_sequence == 3
    assert outbox(spool) == []


def test_events_a_job_did_not_ask_for_are_not_made(spool: Spool, clock: FakeClock) -> None:
    target = CallbackTarget("http://x", SECRET, frozenset({"failed"}))
    job = status("j1")
    emit(spool, clock, target, job, "started")
    emit(spool, clock, target, job, "failed")
    assert outbox(spool) == ["j1~00000001.json"]


def test_a_prepared_delivery_is_decided_by_the_jobs_status(spool: Spool, clock: FakeClock) -> None:
    """What a crash between prepare and commit leaves: the status says whether it happened."""
    data = b'{"sequence": %d, "condition": {"job": "%s"}}'
    put_job(spool, "done", "made", sequence=2)
    put_job(spool, "running", "unmade", sequence=1)
    spool.deliveries.prepare("made", 2, data % (2, b"made"))
    spool.deliveries.prepare("unmade", 2, data % (2, b"unmade"))
    spool.deliveries.prepare("gone", 1, data % (1, b"gone"))  # its accept never happened
    assert callbacks(spool, clock).settle_all() == (1, 2)
    assert outbox(spool) == ["made~00000002.json"]


def test_a_later_sequence_proves_a_change_made_only_where_the_status_names_none(
    spool: Spool, clock: FakeClock
) -> None:
    """A status of an older spoold names no change (``callback_delivery``): its sequence is
    all there is, and one past the delivery's says it was made. One that names a change names
    the last made, and each change commits the one before it first, if made (``settle_job``):
    one still prepared below it was never made (a duplicate refused, a change redone)."""
    data = b'{"delivery_id": "%s", "sequence": 1, "condition": {"job": "%s"}}'
    put_job(spool, "done", "older", sequence=3)
    put_job(spool, "done", "newer", sequence=3)
    newer = spool.dir("done") / "newer" / "status.json"
    newer.write_text(json.dumps({**json.loads(newer.read_text()), "callback_delivery": "c3"}))
    spool.deliveries.prepare("older", 1, data % (b"c1", b"older"))
    spool.deliveries.prepare("newer", 1, data % (b"c1", b"newer"))
    assert callbacks(spool, clock).settle_all() == (1, 1)
    assert outbox(spool) == ["older~00000001.json"]


def test_the_next_owner_commits_what_its_last_owner_left(spool: Spool, clock: FakeClock) -> None:
    spool.deliveries.prepare("j1", 1, b"{}")  # accepted: made, but not committed yet
    spool.deliveries.prepare("j1", 2, b"{}")  # a change that was never made
    emit(spool, clock, CallbackTarget("http://x", SECRET), status("j1", sequence=1), "started")
    assert outbox(spool) == ["j1~00000001.json", "j1~00000002.json"]
    record = spool.deliveries.read("j1~00000002.json")
    assert record is not None and record["event"] == "started"


def test_a_rejection_is_decided_by_its_stage(spool: Spool, clock: FakeClock) -> None:
    stages = {}
    for name, reason in (("decided", True), ("undecided", False)):
        stage = spool.dir("tmp") / f"in-{name}"
        stage.mkdir()
        if reason:
            (stage / "reason.json").write_text("{}")
        stages[name] = str(stage)
    stages["moved"] = str(spool.dir("tmp") / "in-moved")
    for key, path in stages.items():
        spool.deliveries.prepare(key, 1, json.dumps({"condition": {"stage": path}}).encode())
    assert callbacks(spool, clock).settle_all() == (2, 1)
    assert outbox(spool) == ["decided~00000001.json", "moved~00000001.json"]


def test_a_first_event_never_replaces_another_jobs(spool: Spool) -> None:
    """Two files with one job id: the loser must not overwrite the winner's delivery. While
    the winner's change is under way, the loser waits for it (it may yet be dropped)."""
    spool.deliveries.prepare("j1", 1, b"{}", exclusive=True)
    with pytest.raises(JobBusy):
        spool.deliveries.prepare("j1", 1, b"{}", exclusive=True)
    spool.deliveries.commit("j1~00000001.prepared")
    with pytest.raises(FileExistsError):
        spool.deliveries.prepare("j1", 1, b"{}", exclusive=True)
    assert outbox(spool) == ["j1~00000001.json"]


def test_a_failed_posts_error_never_shows_the_urls_user_password_path_or_query(
    spool: Spool, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The probe's callback URL: requests' ConnectionError quotes the request target (``with
    url: /hook?key=...``), which went into spoold.log and the delivery's ``last_error``."""
    port = free_port()
    url = f"http://cbuser:Pa55w0rd@127.0.0.1:{port}/hook?key=CFGKEY123"
    secrets = ("cbuser", "Pa55w0rd", "CFGKEY123", "/hook", "key=")
    emit(spool, clock, CallbackTarget(url, SECRET), status("j1"), "accepted")
    emit(spool, clock, CallbackTarget(url, SECRET), status("j2"), "accepted")
    with caplog.at_level(logging.DEBUG, logger=LOG.name):
        first = sender(spool, clock)
        assert first.deliver("j1~00000001.json", _read(spool, "j1~00000001.json")) is False
        given_up = sender(spool, clock, give_up_after=0.0)
        assert given_up.deliver("j2~00000001.json", _read(spool, "j2~00000001.json")) is False
    given_up_record = spool.deliveries.read("j2~00000001.json", "failed")
    assert given_up_record is not None
    errors = [_read(spool, "j1~00000001.json")["last_error"], given_up_record["last_error"]]
    assert all(e.startswith("ConnectionError: ") and "127.0.0.1" in e for e in errors), errors
    logged = [record.getMessage() for record in caplog.records]
    assert len(logged) == 2 and f"to http://127.0.0.1:{port} " in logged[0], logged
    for text in errors + logged:
        assert not any(secret in text for secret in secrets), text


def test_an_unexpected_failure_of_a_post_is_logged_without_the_urls_secrets(
    spool: Spool, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure that is not requests' own (here one whose text quotes the URL whole) is logged
    with its traceback, the URL in it shown as ``url_shown`` shows it."""
    url = "https://cbuser:Pa55w0rd@hooks.example:8443/hook/T0KEN?key=CFGKEY123"
    emit(spool, clock, CallbackTarget(url, SECRET), status("j1"), "accepted")
    posting = sender(spool, clock)

    class Broken(requests.Session):
        def post(self, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
            raise RuntimeError(f"cannot post to {url!r} (path /hook/T0KEN?key=CFGKEY123)")

    setattr(posting, "_session", Broken)  # noqa: B010 - every post fails unexpectedly
    with caplog.at_level(logging.ERROR, logger=LOG.name):
        posting.start()
        try:
            wait_for(lambda: caplog.records or None)
        finally:
            posting.stop()
    told = caplog.text  # the messages and any traceback logged with them
    assert not any(s in told for s in ("cbuser", "Pa55w0rd", "CFGKEY123", "T0KEN")), told
    assert "unexpected failure" in told and "https://hooks.example:8443" in told
    assert "Traceback" in told and "RuntimeError" in told, told
    assert not any(s in told for s in ("cbuser", "Pa55w0rd", "CFGKEY123", "T0KEN")), told


def _read(spool: Spool, name: str) -> dict[str, Any]:
    record = spool.deliveries.read(name)
    assert record is not None
    return record


def test_later_events_wait_for_an_earlier_one(
    spool: Spool, clock: FakeClock, receiver: Receiver
) -> None:
    target = CallbackTarget(receiver.url, SECRET)
    emit(spool, clock, target, status("j1", sequence=1), "started")
    # Its writer has not committed it yet (the sender would settle it after STALE_PREPARED).
    unfinished = {"created": clock.now().timestamp(), "sequence": 1, "condition": {"job": "j1"}}
    spool.deliveries.prepare("j1", 1, json.dumps(unfinished).encode())
    emit(spool, clock, target, status("j2"), "accepted")
    posting = sender(spool, clock)
    posting.start()
    try:
        assert wait_for(lambda: receiver.bodies() or None)[0]["job_id"] == "j2"
        assert posting.tick() == 0  # j1's first event is not made yet: its second waits
        assert len(receiver.received) == 1
    finally:
        posting.stop()


def test_a_receiver_that_is_down_is_tried_again_later(spool: Spool, clock: FakeClock) -> None:
    port = free_port()
    emit(spool, clock, CallbackTarget(f"http://127.0.0.1:{port}/hook", SECRET), status("j1"),
         "accepted")  # fmt: skip
    posting = sender(spool, clock, initial=10.0)
    assert deliver_all(posting, spool) == [False]
    record = spool.deliveries.read("j1~00000001.json")
    assert record is not None and record["tries"] == 1 and "ConnectionError" in record["last_error"]
    assert record["next_try"] == clock.now().timestamp() + 5.0  # jittered into [5, 10)
    assert posting.tick() == 0  # not due yet
    back = Receiver(port).start()
    try:
        clock.advance(5)
        assert posting.deliver("j1~00000001.json", record)
        verify(back.wait_count(1)[0], SECRET)
    finally:
        back.stop()
    assert outbox(spool) == []


@pytest.mark.parametrize(("answer", "taken"), [(204, True), (302, False), (410, False)])
def test_only_a_2xx_answer_takes_a_delivery(
    spool: Spool, clock: FakeClock, receiver: Receiver, answer: int, taken: bool
) -> None:
    receiver.status = answer
    emit(spool, clock, CallbackTarget(receiver.url, SECRET), status("j1"), "accepted")
    assert deliver_all(sender(spool, clock), spool) == [taken]
    assert outbox(spool) == ([] if taken else ["j1~00000001.json"])


def test_a_delivery_gives_up_into_outbox_failed(
    spool: Spool, clock: FakeClock, receiver: Receiver
) -> None:
    receiver.status = 503
    emit(spool, clock, CallbackTarget(receiver.url, SECRET), status("j1"), "failed")
    posting = sender(spool, clock, give_up_after=3600.0)
    assert deliver_all(posting, spool) == [False]
    clock.advance(3600)
    assert deliver_all(posting, spool) == [False]
    assert outbox(spool) == []
    assert outbox(spool, "failed") == ["j1~00000001.json"]
    shown = run_cli(spool.root, "status")
    assert "1 callback(s) given up" in shown.stdout and "HTTP 503" in shown.stdout, shown
    # Sent back into outbox/ (the page's resend), it is tried again until give_up_after has
    # passed once more, not given up at its first failure.
    clock.advance(60)
    assert spool.deliveries.resend("j1~00000001.json", clock.now().timestamp())
    assert deliver_all(posting, spool) == [False]
    assert outbox(spool) == ["j1~00000001.json"] and outbox(spool, "failed") == []
    assert _read(spool, "j1~00000001.json")["tries"] == 1
    clock.advance(3600)
    assert deliver_all(posting, spool) == [False]
    assert outbox(spool, "failed") == ["j1~00000001.json"], "given up again, once its time is up"


def test_a_slow_receiver_holds_only_its_own_deliveries(
    spool: Spool, clock: FakeClock, receiver: Receiver
) -> None:
    slow = Receiver()
    slow.hold = threading.Event()
    slow.start()
    try:
        for job_id in ("slow1", "slow2"):
            emit(spool, clock, CallbackTarget(slow.url, SECRET), status(job_id), "accepted")
        for job_id in ("fast1", "fast2", "fast3"):
            emit(spool, clock, CallbackTarget(receiver.url, SECRET), status(job_id), "accepted")
        posting = sender(spool, clock, workers=2, per_host=1)
        posting.start()
        try:
            receiver.wait_count(3)
            slow.wait_count(1)  # its first may reach it after the others: no luck asked for
            assert len(slow.received) == 1  # per_host: its second waits, not the others
            # Both due, one in flight, one held by per_host: nothing to wake up for (no spin).
            assert posting.next_due(clock.now().timestamp()) is None
            slow.hold.set()
            slow.wait_count(2)
            wait_for(lambda: not outbox(spool), what="an empty outbox")
        finally:
            posting.stop()
    finally:
        slow.stop()


def test_a_callback_secret_is_read_from_secrets_dir_and_never_written(
    spool: Spool, clock: FakeClock, receiver: Receiver, tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "CB").write_text("from-the-secrets-dir\n")
    (secrets / "CB").chmod(0o600)
    made = callbacks(spool, clock, SecretStore(secrets))
    document = {"callback": {"url": receiver.url, "secret": "${secret:CB}"}}
    with made.announce(made.target(document), "accepted", status("j1")):
        pass
    assert b"from-the-secrets-dir" not in (spool.dir("outbox") / "j1~00000001.json").read_bytes()
    assert deliver_all(sender(spool, clock), spool) == [True]
    verify(receiver.wait_count(1)[0], "from-the-secrets-dir")


def test_the_callback_of_a_job_and_the_defaults(spool: Spool, clock: FakeClock) -> None:
    plain = callbacks(spool, clock)
    assert plain.target({}) is None
    with pytest.raises(CallbackError, match="no secret"):
        plain.target({"callback": {"url": "http://127.0.0.1/x"}})
    default = Callbacks(spool, clock, SecretStore(None), logger=LOG,
                        default_url="http://127.0.0.1/d", default_secret="d")  # fmt: skip
    own = default.target({"callback": {"events": ["failed"]}, "variables": {"S": "v"}})
    assert own == CallbackTarget("http://127.0.0.1/d", "d", frozenset({"failed"}))
    mine = default.target({"callback": {"url": "http://127.0.0.1/m", "secret": "${S}"},
                           "variables": {"S": "from-a-variable"}})  # fmt: skip
    assert mine == CallbackTarget("http://127.0.0.1/m", "from-a-variable")


def test_a_default_callback_needs_a_secret(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("default_callback_url: http://127.0.0.1/x\n")
    with pytest.raises(ConfigError, match="default_callback_secret"):
        load_config(config)
    config.write_text("default_callback_url: ftp://127.0.0.1/x\ndefault_callback_secret: s\n")
    with pytest.raises(ConfigError, match="http:// or https://"):
        load_config(config)
    config.write_text(
        "default_callback_url: http://127.0.0.1/x\ndefault_callback_secret: s\n"
        "callbacks: {timeout: 3s, workers: 8, backoff: {initial: 1s, max: 2m}, give_up_after: 1d}\n"
    )
    assert load_config(config).callbacks == CallbackSettings(
        timeout=3.0, workers=8, initial=1.0, maximum=120.0, give_up_after=86400.0
    )


def test_the_sender_settles_what_a_killed_writer_left(spool: Spool, clock: FakeClock) -> None:
    """A ``spoold cancel`` killed between its prepare and its commit: decided later, not never."""
    put_job(spool, "failed", "j1", sequence=1)
    emit(spool, clock, CallbackTarget("http://127.0.0.1:9/x", SECRET), status("j1"), "cancelled")
    (spool.dir("outbox") / "j1~00000001.json").rename(spool.dir("outbox") / "j1~00000001.prepared")
    posting = sender(spool, clock)
    assert posting.tick() == 0 and outbox(spool) == ["j1~00000001.prepared"]
    clock.advance(STALE_PREPARED)
    posting.tick()
    assert outbox(spool) == ["j1~00000001.prepared"], "its writer may still be at it"
    clock.advance(1)
    posting.tick()
    assert outbox(spool) == ["j1~00000001.json"]


def test_a_damaged_delivery_is_put_aside(spool: Spool, clock: FakeClock) -> None:
    (spool.dir("outbox") / "j1~00000001.json").write_text('{"key": "j1"')
    assert sender(spool, clock).tick() == 0
    assert outbox(spool) == [] and outbox(spool, "failed") == ["j1~00000001.json"]


def test_intake_announces_and_refuses_what_it_cannot_sign(
    spool: Spool, clock: FakeClock, tmp_path: Path
) -> None:
    made = Callbacks(spool, clock, SecretStore(None), logger=LOG,
                     default_url="http://127.0.0.1:9/d", default_secret="d")  # fmt: skip
    intake = intake_for(spool, clock, callbacks=made)

    def offer(name: str, text: str) -> Accepted | Rejected:
        (tmp_path / name).write_text(text)
        return intake.decide(spool.stages.stage_file(tmp_path / name, max_size=1 << 20))

    job = "job_id: a\nexecutor: local\nproduct: {commands: 'true'}\n"
    assert isinstance(offer("a.yaml", job), Accepted)
    first = spool.deliveries.read("a~00000001.json")
    assert first is not None and first["event"] == "accepted"
    # The same id again: rejected, and the first job's delivery is left as it was.
    again = offer("again.yaml", job)
    assert isinstance(again, Rejected) and again.reason["code"] == "duplicate"
    assert spool.deliveries.read("a~00000001.json") == first
    unsigned = offer(
        "b.yaml", job.replace("a\n", "b\ncallback: {url: 'http://127.0.0.1:9/b'}\n", 1)
    )
    assert isinstance(unsigned, Accepted)  # the default secret signs a job's own url
    rejections = [n for n in outbox(spool) if n.startswith("rejected-")]
    assert len(rejections) == 1
    record = spool.deliveries.read(rejections[0])
    assert record is not None and json.loads(record["body"])["job_id"] == "a"
    intake = intake_for(
        spool, clock, callbacks=Callbacks(spool, clock, SecretStore(None), logger=LOG)
    )
    refused = offer("c.yaml", job.replace("a\n", "c\ncallback: {url: 'http://127.0.0.1:9/c'}\n", 1))
    assert isinstance(refused, Rejected) and refused.reason["code"] == "callback"
    assert "no secret" in refused.reason["reason"]


def test_cancel_and_retry_from_the_command_line_are_announced(
    spool: Spool, clock: FakeClock, tmp_path: Path
) -> None:
    made = Callbacks(spool, clock, SecretStore(None), logger=LOG,
                     default_url="http://127.0.0.1:9/d", default_secret="d")  # fmt: skip
    intake = intake_for(spool, clock, callbacks=made)
    (tmp_path / "a.yaml").write_text("job_id: a\nexecutor: local\nproduct: {commands: 'true'}\n")
    assert isinstance(intake.decide(spool.stages.stage_file(tmp_path / "a.yaml", max_size=1 << 20)),
                      Accepted)  # fmt: skip
    control = JobControl(spool, clock, who="tester", callbacks=made)
    assert control.cancel("a").cancelled
    control.retry("a")
    sent = [spool.deliveries.read(name) or {} for name in outbox(spool)]
    assert [(r["sequence"], r["event"]) for r in sent] == [
        (1, "accepted"), (2, "cancelled"), (3, "retrying"),
    ]  # fmt: skip
    assert spool.jobs.read_status(spool.jobs.get("a"))["callback_sequence"] == 3


def test_the_test_receiver_takes_no_request_cut_short() -> None:
    """A sender killed between its headers and its body (urllib3 sends them apart) leaves a
    request cut short: no delivery, and not a body of nothing that breaks the checks of every
    test using the receiver (seen in the shared-spool test, where a host is killed)."""
    receiver = Receiver().start()
    try:
        with socket.create_connection(("127.0.0.1", receiver.port)) as sock:
            sock.sendall(b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
        answer = requests.post(receiver.url, data=b'{"event": "finished"}', timeout=10)
        assert answer.status_code == 200
        assert receiver.bodies() == [{"event": "finished"}]
    finally:
        receiver.stop()


def test_a_backlog_waiting_for_a_receiver_is_not_walked_at_every_tick(
    spool: Spool, clock: FakeClock
) -> None:
    """A receiver down for a while leaves thousands of deliveries waiting out their backoff.
    Every tick (each post's end wakes one) read every one of them to find what was due: 9000
    waiting kept the daemon at 70 % of a core. A tick now looks at what is due."""
    port = free_port()  # nothing listens: each try is refused at once
    target = CallbackTarget(f"http://127.0.0.1:{port}/hook", SECRET)
    for n in range(300):
        emit(spool, clock, target, status(f"j{n:03d}"), "accepted")
    emit(spool, clock, target, status("j000", sequence=1), "started")  # waits behind its first
    posting = sender(spool, clock, initial=10.0)
    assert deliver_all(posting, spool).count(False) == 301  # each tried once: due in 5 s
    looked: list[str] = []
    read = posting._record

    def counted(name: str) -> dict[str, Any] | None:
        looked.append(name)
        return read(name)

    setattr(posting, "_record", counted)  # noqa: B010 - a spy on the instance
    assert posting.tick() == 0
    assert len(looked) == 300, "the first tick reads each key's first delivery once"
    looked.clear()
    for _ in range(20):
        posting.wake()  # as a commit here would: listed again, nothing new
        clock.advance(0.1)
        assert posting.tick() == 0
    assert looked == [], f"{len(looked)} deliveries read by 20 ticks with nothing due"
    assert posting.next_due(clock.now().timestamp()) == pytest.approx(clock.now().timestamp() + 3.0)
    clock.advance(3.0)
    assert posting.tick() == 2, "all due: as many as one receiver may have in flight (per_host)"


def test_a_poll_lists_outbox_only_when_it_may_have_changed(spool: Spool, clock: FakeClock) -> None:
    """Each poll (every second) listed outbox/ for what other hosts commit: 10,000 deliveries
    waiting for a receiver that is down, 6 ms a second. Once outbox/'s stamp has settled, a
    poll that finds it unchanged lists nothing (one in LIST_EVERY does all the same); a
    delivery another host commits is found by the next poll, and a commit here at once."""
    port = free_port()  # nothing listens: each try is refused at once
    target = CallbackTarget(f"http://127.0.0.1:{port}/hook", SECRET)
    for n in range(20):
        emit(spool, clock, target, status(f"j{n:03d}"), "accepted")
    posting = sender(spool, clock, initial=600.0)
    assert deliver_all(posting, spool).count(False) == 20
    listings = count_listings(spool)
    for _ in range(int(SETTLE) + 1):  # outbox/'s stamp seen unchanged for SETTLE seconds
        clock.advance(1.0)
        assert posting.tick() == 0
    listings.clear()
    for _ in range(LIST_EVERY - 1):
        clock.advance(1.0)
        assert posting.tick() == 0
    assert listings == [], "nothing changed: not listed"
    clock.advance(1.0)
    assert posting.tick() == 0
    assert listings == [""], "the LIST_EVERY-th poll lists all the same"
    for _ in range(int(SETTLE) + 2):
        clock.advance(1.0)
        posting.tick()
    listings.clear()
    emit(spool, clock, target, status("other"), "accepted")  # as another host would commit it
    clock.advance(1.0)
    assert posting.tick() == 1, "found by the next poll, and sent"
    assert listings == [""]


def test_a_commit_outboxs_watch_tells_is_sent_without_a_listing(
    spool: Spool, clock: FakeClock
) -> None:
    """A delivery a worker process or the CLI commits woke no one: the sender found it at its
    next poll, a second later at worst (493 ms from a job's end to its callback, median).
    Told by outbox/'s watch, it is added by its name alone, however long the backlog: no
    listing. The sender's own writes, temporary names, and names put aside wake nothing."""
    port = free_port()  # nothing listens: each try is refused at once
    target = CallbackTarget(f"http://127.0.0.1:{port}/hook", SECRET)
    for n in range(50):
        emit(spool, clock, target, status(f"j{n:03d}"), "accepted")
    woken = threading.Event()
    posting = Sender(spool, callbacks(spool, clock), clock, CallbackSettings(initial=600.0), LOG,
                     draw=lambda: 0.0, wake=woken)  # fmt: skip
    assert deliver_all(posting, spool).count(False) == 50
    posting.pace(1.0, 30.0)
    assert posting.tick() == 0  # listed once: the watch began
    listings = count_listings(spool)
    woken.clear()
    for quiet in (".spoold-new~00000001.json.1a2b.tmp", ".adopt-h2-j000~00000001.json",
                  "j000~00000001.json"):  # fmt: skip
        posting.changed(quiet)
    assert not woken.is_set(), "temporary, put aside, or one of the sender's own writes"
    emit(spool, clock, target, status("new"), "accepted")
    posting.changed("new~00000001.json")
    assert woken.is_set()
    assert posting.tick() == 1, "the new delivery, due at once, handed out"
    assert listings == [], "found by its name, not by listing 51"
    posting.changed(None)  # the kernel dropped events: anything may have come
    clock.advance(0.1)
    posting.tick()
    assert listings == [""]


def test_a_sender_rests_while_a_watched_outbox_holds_nothing(
    spool: Spool, clock: FakeClock, receiver: Receiver
) -> None:
    """An idle daemon's sender looked at outbox/ every second (5.8 ms of CPU in 30 s). With
    outbox/ watched and empty it waits ``rest``; anything in it, or in flight, and it polls."""
    posting = sender(spool, clock)
    posting.tick()
    assert posting._wait() == 1.0, "not watched: a poll"
    posting.pace(1.0, 30.0)
    assert posting._wait() == 1.0, "told to look first"
    posting.tick()
    assert posting._wait() == 30.0
    emit(spool, clock, CallbackTarget(receiver.url, SECRET), status("j1"), "accepted")
    posting.changed("j1~00000001.json")
    assert posting._wait() == 1.0, "something arrived"
    posting.start()
    try:
        receiver.wait_count(1)
        wait_for(lambda: outbox(spool) == [], what="the delivery removed")
        posting.changed("j1~00000001.json")  # as the watch tells its removal
        wait_for(lambda: posting._wait() == 30.0, what="empty again: resting")
    finally:
        posting.stop()
    posting.pace(1.0, None)
    posting.tick()
    assert posting._wait() == 1.0, "the watch lost: polls again"


def test_a_key_followed_by_its_names_alone_sends_each_delivery_in_turn(
    spool: Spool, clock: FakeClock, receiver: Receiver
) -> None:
    """Followed by the names its watch tells, not listed: a delivery prepared, then committed
    (its prepared name renamed away), then the next one of the same job. Told only of names
    that came, the sender kept the prepared name as the job's head, and the job's later
    deliveries waited behind it for a listing (the next poll: never, with an hour's)."""
    target = CallbackTarget(receiver.url, SECRET)
    posting = sender(spool, clock)
    emit(spool, clock, target, status("k"), "accepted")
    posting.pace(3600.0, 30.0)
    told = set(os.listdir(spool.dir("outbox")))  # what its first look finds

    def tell() -> None:
        """The watch's events: every name that came or went since."""
        now = set(os.listdir(spool.dir("outbox")))
        for name in sorted(now ^ told):
            posting.changed(name)
        told.clear()
        told.update(now)

    posting.start()
    try:
        receiver.wait_count(1)
        wait_for(lambda: outbox(spool) == [], what="the first delivered")
        tell()
        for sequence, event in ((1, "started"), (2, "succeeded")):
            with callbacks(spool, clock).announce(target, event, status("k", sequence=sequence)):
                tell()  # prepared: not sent before the change is made
                clock.advance(0.1)
            tell()
            receiver.wait_count(sequence + 1)
            wait_for(lambda: outbox(spool) == [], what="delivered")
        tell()
        wait_for(lambda: posting._wait() == 30.0, what="resting")
    finally:
        posting.stop()
    assert [b["event"] for b in receiver.bodies()] == ["accepted", "started", "succeeded"]


def test_a_redirect_is_not_followed_and_does_not_take_a_delivery(
    spool: Spool, clock: FakeClock, receiver: Receiver
) -> None:
    """A 307 keeps the method and the body: followed, the signed body would go wherever the
    receiver (or whoever answers in its name) points. Not followed; not taken; tried again."""
    elsewhere = Receiver().start()
    try:
        receiver.status, receiver.location = 307, elsewhere.url
        emit(spool, clock, CallbackTarget(receiver.url, SECRET), status("j1"), "accepted")
        assert deliver_all(sender(spool, clock), spool) == [False]
        assert len(receiver.received) == 1 and elsewhere.received == []
        assert _read(spool, "j1~00000001.json")["last_error"] == "HTTP 307"
    finally:
        elsewhere.stop()


def test_the_timestamp_header_is_the_events_unix_seconds_on_every_try(
    spool: Spool, clock: FakeClock, receiver: Receiver
) -> None:
    """``X-Spoold-Timestamp``: Unix seconds, when the event happened; a retry sends the stored
    bytes, so a try an hour later carries the same timestamp and signature."""
    happened = str(int(clock.now().timestamp()))
    emit(spool, clock, CallbackTarget(receiver.url, SECRET), status("j1"), "accepted")
    receiver.status = 500
    posting = sender(spool, clock)
    assert deliver_all(posting, spool) == [False]
    clock.advance(3600)
    receiver.status = 200
    assert deliver_all(posting, spool) == [True]
    first, second = receiver.wait_count(2)
    assert first.headers["x-spoold-timestamp"] == happened
    assert second.headers["x-spoold-timestamp"] == happened
    assert second.headers["x-spoold-signature"] == first.headers["x-spoold-signature"]
    assert second.body == first.body
    verify(second, SECRET)


def test_the_backoff_grows_by_its_multiplier_up_to_its_maximum(
    spool: Spool, clock: FakeClock
) -> None:
    """``callbacks.backoff``: initial 10 s, doubled at each failed try, at most 40 s; jittered
    into [wait/2, wait) (the draw here: 0, the lower end; just under 1, the upper)."""
    port = free_port()  # nothing listens: each try is refused at once
    emit(spool, clock, CallbackTarget(f"http://127.0.0.1:{port}/hook", SECRET), status("j1"),
         "accepted")  # fmt: skip
    for draw, expected in ((0.0, [5.0, 10.0, 20.0, 20.0]), (0.999, [10.0, 20.0, 40.0, 40.0])):
        posting = Sender(spool, callbacks(spool, clock), clock,
                         CallbackSettings(initial=10.0, maximum=40.0, multiplier=2.0), LOG,
                         draw=functools.partial(float, draw))  # fmt: skip
        waits: list[float] = []
        for _ in expected:
            record = _read(spool, "j1~00000001.json")
            assert posting.deliver("j1~00000001.json", record) is False
            record = _read(spool, "j1~00000001.json")
            waits.append(record["next_try"] - clock.now().timestamp())
            clock.advance(waits[-1])
        assert waits == pytest.approx(expected, abs=0.05), waits
        spool.deliveries.update("j1~00000001.json", json.dumps({**record, "tries": 0}).encode())


def test_no_more_than_workers_deliveries_are_handed_out_at_once(
    spool: Spool, clock: FakeClock
) -> None:
    """``callbacks.workers``: deliveries in flight at once, whatever receivers they go to. The
    sender's threads are not started: what a tick hands out stays in flight."""
    for n in range(3):
        emit(spool, clock, CallbackTarget(f"http://127.0.0.1:{9000 + n}/hook", SECRET),
             status(f"j{n}"), "accepted")  # fmt: skip
    posting = sender(spool, clock, workers=2, per_host=2)
    assert posting.tick() == 2
    assert posting.tick() == 0, "both workers are busy: the third waits"


@pytest.mark.parametrize("giving_up", [False, True], ids=["tried-again", "given-up"])
def test_a_delivery_removed_by_hand_during_a_failing_try_stays_removed(
    spool: Spool, clock: FakeClock, giving_up: bool
) -> None:
    """An operator deletes a delivery stuck on a receiver that hangs, while a try of it is
    under way; the try then fails. It stays gone: not written back to be tried again for
    ``give_up_after``, nor (a try past that) put into outbox/failed/."""
    emit(spool, clock, CallbackTarget("http://127.0.0.1:9/hook", SECRET), status("j1"), "failed")
    posting = sender(spool, clock)
    if giving_up:
        clock.advance(posting._settings.give_up_after)

    class Hanging(requests.Session):
        def post(self, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
            (spool.dir("outbox") / "j1~00000001.json").unlink()  # rm, while the try waits
            raise requests.ConnectTimeout("timed out")

    setattr(posting, "_session", Hanging)  # noqa: B010 - a receiver that never answers
    assert posting.deliver("j1~00000001.json", _read(spool, "j1~00000001.json")) is False
    assert outbox(spool) == [] and outbox(spool, "failed") == []
