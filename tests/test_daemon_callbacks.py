"""Signed callbacks (SPEC section 7) end to end: the real daemon posting to a real receiver."""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import (
    StartDaemon,
    daemon_starter,
    drop,
    gate_wait,
    local_job,
    run_cli,
    wait_finished,
    wait_for,
    wait_rejected,
    write_config,
)
from tests.loopback import free_port
from tests.receiver import Receiver, verify

pytestmark = pytest.mark.daemon

FLAKY = 'test "$SPOOLD_ATTEMPT" -gt 1 || exit 75'  # fails its first attempt only
QUICK = {"backoff": {"initial": "200ms", "max": "1s"}}  # failed tries come back soon
LIFE = ["accepted", "started", "succeeded"]  # the events of a job that succeeds at once

MakeReceiver = Callable[..., Receiver]


@pytest.fixture
def start_daemon(spool_dir: Path, tmp_path: Path) -> Iterator[StartDaemon]:
    """Start a daemon on ``spool_dir`` with a test config plus ``overrides``; all killed after."""
    yield from daemon_starter(spool_dir, tmp_path / "config.yaml")


@pytest.fixture
def receiver() -> Iterator[MakeReceiver]:
    """Start receivers on loopback; all stopped after."""
    made: list[Receiver] = []

    def make(port: int = 0, status: int = 200) -> Receiver:
        made.append(Receiver(port, status=status).start())
        return made[-1]

    yield make
    for each in made:
        each.stop()


def hook(url: str, secret: str, events: list[str] | None = None) -> dict[str, Any]:
    """A job's ``callback:`` block."""
    block: dict[str, Any] = {"url": url, "secret": secret}
    if events is not None:
        block["events"] = events
    return {"callback": block}


def outbox(spool: Path) -> list[str]:
    """The deliveries outbox/ holds (made or in the making), not the given-up ones."""
    return sorted(
        n.name for n in (spool / "outbox").iterdir()
        if n.is_file() and not n.name.startswith(".") and n.name.endswith((".json", ".prepared"))
    )  # fmt: skip


def wait_outbox_empty(spool: Path) -> None:
    wait_for(lambda: not outbox(spool), what=f"outbox/ to be empty (holds {outbox(spool)})")


def per_job(bodies: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Bodies by job id, in order of arrival, each delivery once (a receiver dedupes by id)."""
    seen: set[str] = set()
    jobs: dict[str, list[dict[str, Any]]] = {}
    for body in bodies:
        if body["delivery_id"] not in seen:
            seen.add(body["delivery_id"])
            jobs.setdefault(body["job_id"], []).append(body)
    return jobs


def wait_events(
    receiver: Receiver, job_id: str, count: int, bound: float = 60.0
) -> list[dict[str, Any]]:
    """The first ``count`` distinct deliveries of one job, once they all arrived."""

    def arrived() -> list[dict[str, Any]] | None:
        got = per_job(receiver.bodies()).get(job_id, [])
        return got if len(got) >= count else None

    return wait_for(arrived, bound=bound, what=f"{count} callbacks of {job_id}")


def events(bodies: list[dict[str, Any]]) -> list[str]:
    return [b["event"] for b in bodies]


def sequences(bodies: list[dict[str, Any]]) -> list[int]:
    return [b["sequence"] for b in bodies]


def test_a_job_calls_back_signed_in_order(
    start_daemon: StartDaemon, receiver: MakeReceiver, spool_dir: Path
) -> None:
    secret = "s3cret-one"
    r = receiver()
    start_daemon()
    drop(spool_dir, "one.yaml", local_job("one", "echo hi", **hook(r.url, secret)))
    assert wait_finished(spool_dir, "one")[0] == "done"
    received = r.wait_count(3)
    wait_outbox_empty(spool_dir)
    assert len(r.received) == 3, r.bodies()
    bodies = [verify(each, secret) for each in received]
    assert events(bodies) == LIFE and sequences(bodies) == [1, 2, 3]
    assert [b["state"] for b in bodies] == ["pending", "running", "succeeded"]
    assert {b["job_id"] for b in bodies} == {"one"}
    assert [b["attempt"] for b in bodies] == [0, 1, 1]
    assert bodies[2]["exit_code"] == 0 and bodies[2]["error"] is None
    # What the attempt cost comes with its end: 3 bytes of output ("hi\n"), measured CPU.
    assert bodies[0]["usage"] is None and bodies[1]["usage"] is None
    assert bodies[2]["usage"]["output_bytes"] == 3 and bodies[2]["usage"]["source"] == "kernel"
    assert bodies[2]["usage"]["cpu_user_seconds"] is not None
    assert len({b["delivery_id"] for b in bodies}) == 3
    for each, body in zip(received, bodies, strict=True):
        assert each.path == "/hook"
        assert each.headers["x-spoold-delivery"] == body["delivery_id"]
        assert each.headers["x-spoold-event"] == body["event"]
        assert each.headers["x-spoold-timestamp"].isdigit()


def test_a_retry_is_told_and_an_events_filter_applies(
    start_daemon: StartDaemon, receiver: MakeReceiver, spool_dir: Path
) -> None:
    secret = "s3cret-two"
    r = receiver()
    start_daemon()
    flaky = local_job("flaky", FLAKY, retries=1, backoff="300ms", **hook(r.url, secret))
    final = local_job("final", "true", **hook(r.url, secret, ["succeeded", "failed"]))
    drop(spool_dir, "flaky.yaml", flaky)
    drop(spool_dir, "final.yaml", final)
    for job_id in ("flaky", "final"):
        assert wait_finished(spool_dir, job_id)[0] == "done"
    wait_outbox_empty(spool_dir)
    for each in r.received:
        verify(each, secret)
    jobs = per_job(r.bodies())
    assert len(r.received) == 6, r.bodies()  # five of flaky, one of final, none twice
    got = jobs["flaky"]
    assert events(got) == ["accepted", "started", "retrying", "started", "succeeded"]
    assert sequences(got) == [1, 2, 3, 4, 5]
    assert [b["attempt"] for b in got] == [0, 1, 1, 2, 2]
    assert got[2]["state"] == "pending" and got[2]["exit_code"] == 75
    assert isinstance(got[2]["next_attempt_at"], str) and got[2]["next_attempt_at"]
    assert "next_attempt_at" not in got[4]
    assert events(jobs["final"]) == ["succeeded"] and sequences(jobs["final"]) == [1]


def test_a_rejected_file_calls_back_the_default(
    start_daemon: StartDaemon, receiver: MakeReceiver, spool_dir: Path
) -> None:
    secret = "s3cret-default"
    r = receiver()
    start_daemon(default_callback_url=r.url, default_callback_secret=secret)
    drop(spool_dir, "broken.yaml", "job_id: [unclosed")
    reason = wait_rejected(spool_dir, "broken.yaml")
    (received,) = r.wait_count(1)
    wait_outbox_empty(spool_dir)
    assert len(r.received) == 1, r.bodies()
    body = verify(received, secret)
    assert body["event"] == "rejected" and body["state"] == "rejected"
    assert body["file"] == "broken.yaml" and body["sequence"] == 1
    assert body["code"] and body["code"] == reason.get("code")
    assert isinstance(body["error"], str) and body["error"]


def test_a_file_refused_a_secret_is_not_signed_with_it_where_it_asks(
    start_daemon: StartDaemon, receiver: MakeReceiver, spool_dir: Path, tmp_path: Path
) -> None:
    """A submitter whose policy allows only the secret SHORT drops a file whose callback is
    signed with TOKEN, at a URL of their own: the file was rejected (not_allowed), and its
    ``rejected`` event still went to that URL signed with TOKEN, handing out a signature under
    a secret the policy keeps from them. It goes to the default callback now."""
    theirs, ours = receiver(), receiver()
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    for name in ("TOKEN", "SHORT"):
        (secrets / name).write_text(f"value-of-{name}\n")
        (secrets / name).chmod(0o600)
    policy = {"users": {"nobody": {"executors": ["local"], "secrets": ["SHORT"]}}}
    start_daemon(secrets_dir=str(secrets), policy=policy, default_callback_url=ours.url,
                 default_callback_secret="s3cret-default")  # fmt: skip
    document = local_job("grab", "true", **hook(theirs.url, "${secret:TOKEN}"))
    nobody = pwd.getpwnam("nobody")
    staged = tmp_path / "grab.yaml"
    staged.write_text(yaml.safe_dump(document))
    os.chown(staged, nobody.pw_uid, nobody.pw_gid)
    os.rename(staged, spool_dir / "incoming" / "grab.yaml")
    reason = wait_rejected(spool_dir, "grab.yaml")
    assert reason["code"] == "not_allowed", reason
    (told,) = ours.wait_count(1)
    body = verify(told, "s3cret-default")
    assert (body["event"], body["file"], body["code"]) == ("rejected", "grab.yaml", "not_allowed")
    wait_outbox_empty(spool_dir)
    assert theirs.received == []


def _head_tried(spool: Path, job_id: str) -> bool:
    """Whether the first delivery of a job has been tried (and failed) at least once."""
    try:
        record = json.loads((spool / "outbox" / f"{job_id}~00000001.json").read_text())
    except FileNotFoundError:
        return False
    return int(record.get("tries") or 0) >= 1


def test_deliveries_survive_an_outage_and_a_crash(
    start_daemon: StartDaemon, receiver: MakeReceiver, spool_dir: Path
) -> None:
    secret = "s3cret-outage"
    port = free_port()  # nothing listens: the receiver is down
    url = f"http://127.0.0.1:{port}/hook"
    daemon = start_daemon(callbacks=QUICK)
    jobs = [f"down-{n}" for n in range(3)]
    for job_id in jobs:
        drop(spool_dir, f"{job_id}.yaml", local_job(job_id, "true", **hook(url, secret)))
    for job_id in jobs:
        assert wait_finished(spool_dir, job_id)[0] == "done"
    expected = sorted(f"{job_id}~{n:08d}.json" for job_id in jobs for n in (1, 2, 3))
    wait_for(lambda: outbox(spool_dir) == expected, what="every delivery waiting in outbox/")
    for job_id in jobs:
        wait_for(
            functools.partial(_head_tried, spool_dir, job_id), what=f"a failed try for {job_id}"
        )
    daemon.kill()

    r = receiver(port)
    start_daemon(callbacks=QUICK)  # a new daemon, on the same spool and config
    for job_id in jobs:
        got = wait_events(r, job_id, 3)
        assert sequences(got) == [1, 2, 3] and events(got) == LIFE, got
    wait_outbox_empty(spool_dir)
    for each in r.received:
        verify(each, secret)


def test_a_slow_receiver_stalls_nobody_else(
    start_daemon: StartDaemon, receiver: MakeReceiver, spool_dir: Path
) -> None:
    secret = "s3cret-slow"
    slow, fast = receiver(), receiver()
    slow.hold = threading.Event()
    start_daemon(callbacks={"timeout": "90s"})  # the held answer must not time out
    drop(spool_dir, "slow.yaml", local_job("slow", "true", **hook(slow.url, secret)))
    slow.wait_count(1)  # its first delivery is in flight, and stays there
    others = [f"fast-{n}" for n in range(3)]
    for job_id in others:
        drop(spool_dir, f"{job_id}.yaml", local_job(job_id, "true", **hook(fast.url, secret)))
    for job_id in ["slow", *others]:
        assert wait_finished(spool_dir, job_id)[0] == "done"
    for job_id in others:
        assert sequences(wait_events(fast, job_id, 3)) == [1, 2, 3]
    assert not slow.hold.is_set()
    assert events(slow.bodies()) == ["accepted"], "slow's later events did not wait their turn"
    slow.hold.set()
    got = wait_events(slow, "slow", 3)
    assert events(got) == LIFE and sequences(got) == [1, 2, 3]
    wait_outbox_empty(spool_dir)
    assert len(slow.received) == 3 and len(fast.received) == 9


def test_a_failed_delivery_is_retried_until_taken(
    start_daemon: StartDaemon, receiver: MakeReceiver, spool_dir: Path
) -> None:
    secret = "s3cret-500"
    r = receiver(status=500)
    start_daemon(callbacks=QUICK)
    drop(spool_dir, "again.yaml", local_job("again", "true", **hook(r.url, secret)))

    def repeated() -> str | None:
        counts = Counter(each.headers["x-spoold-delivery"] for each in list(r.received))
        return next((d for d, n in counts.items() if n >= 2), None)

    delivery = wait_for(repeated, what="a delivery tried twice")
    tries = [each for each in list(r.received) if each.headers["x-spoold-delivery"] == delivery]
    assert tries[0].body == tries[1].body, "a retried delivery must be the same delivery"
    assert verify(tries[0], secret)["sequence"] == 1
    r.status = 200
    assert sequences(wait_events(r, "again", 3)) == [1, 2, 3]
    wait_outbox_empty(spool_dir)
    assert wait_finished(spool_dir, "again")[0] == "done"


def test_a_delivery_is_given_up_and_status_shows_it(
    start_daemon: StartDaemon, receiver: MakeReceiver, spool_dir: Path
) -> None:
    secret = "s3cret-give-up"
    r = receiver(status=500)
    start_daemon(callbacks={**QUICK, "give_up_after": "1s"})
    job = local_job("doomed", "true", **hook(r.url, secret, ["succeeded"]))
    drop(spool_dir, "doomed.yaml", job)
    assert wait_finished(spool_dir, "doomed")[0] == "done"
    failed = spool_dir / "outbox" / "failed"
    name = "doomed~00000001.json"
    wait_for((failed / name).exists, what="the delivery to be given up")
    assert not outbox(spool_dir)
    record = json.loads((failed / name).read_text())
    assert record["event"] == "succeeded" and record["last_error"] == "HTTP 500"
    assert record["tries"] >= 2 and len(r.received) == record["tries"]
    result = run_cli(spool_dir, "status")
    assert result.returncode == 0, result.stderr
    assert "given up" in result.stdout and name in result.stdout, result.stdout
    line = next(line for line in result.stdout.splitlines() if name in line)
    # The URL as spoold's log shows it: scheme, host and port (its path may hold a hook's key).
    shown = r.url.removesuffix("/hook")
    assert "succeeded" in line and shown in line and "HTTP 500" in line, line
    assert r.url not in line, line
    # So in what status --json and the API's summary (a read token's) give.
    summary = json.loads(run_cli(spool_dir, "status", "--json").stdout)
    assert [item["url"] for item in summary["callbacks_given_up"]] == [shown], summary


def test_what_a_worker_process_and_the_cli_commit_goes_out_without_a_poll(
    start_daemon: StartDaemon, receiver: MakeReceiver, spool_dir: Path
) -> None:
    """A job's end is committed by its worker process, a retry by the CLI: neither woke the
    daemon's sender, which found them at its next poll (493 ms from a job's end to its
    callback, median, measured). outbox/ is watched now: with polls an hour apart, all three of one
    job's deliveries go out, each after the one before (its prepared name gone by then)."""
    secret = "s3cret-watched"
    r = receiver()
    start_daemon(poll_interval="1h", rescan_interval="1h")
    hooked = hook(r.url, secret, ["failed", "retrying"])
    drop(spool_dir, "ends.yaml", local_job("ends", "exit 3", **hooked))
    assert wait_finished(spool_dir, "ends")[0] == "failed"
    r.wait_count(1)
    assert run_cli(spool_dir, "retry", "ends").returncode == 0
    got = [verify(each, secret) for each in r.wait_count(3)]
    assert events(got) == ["failed", "retrying", "failed"] and sequences(got) == [1, 2, 3]


@pytest.mark.parametrize("how", ["moved", "removed"])
def test_outbox_made_again_is_watched_again(
    start_daemon: StartDaemon, receiver: MakeReceiver, spool_dir: Path, how: str
) -> None:
    """outbox/ moved away (the watch followed it, and the senders rested as if it were
    watched) or removed, and made again: a job's callback waited for a poll, an hour here,
    until the daemon restarted. Its watch is taken up again."""
    secret = "s3cret-again"
    r = receiver()
    daemon = start_daemon(poll_interval="1h", rescan_interval="1h")
    outbox = spool_dir / "outbox"
    if how == "moved":
        outbox.rename(spool_dir / "outbox.old")
    else:
        shutil.rmtree(outbox)
    outbox.mkdir()
    wait_for(lambda: "outbox is watched again" in daemon.log(), what="outbox/ watched again")
    drop(spool_dir, "again.yaml", local_job("again", "exit 3", **hook(r.url, secret, ["failed"])))
    (failed,) = r.wait_count(1)
    assert verify(failed, secret)["event"] == "failed"


def test_a_short_secret_masks_what_was_said_not_the_status_documents_own_names(
    start_daemon: StartDaemon, receiver: MakeReceiver, spool_dir: Path
) -> None:
    """A careless submitter's callback secret ``s``: every ``s`` of status.json was masked,
    its field names too ("***tate"), and ``spoold retry`` of the job failed with KeyError
    'state'; the callbacks' bodies lost their names alike. Only what a job, its executor or
    its submitter said is masked (errors, results, labels, the log); spoold's own names and
    values (states, ids, times, counts) are written as they are."""
    r = receiver()
    start_daemon()
    job = local_job("sad", "echo 'this is s'; exit 3", labels={"s": "this is s"},
                    **hook(r.url, "s", ["failed", "retrying"]))  # fmt: skip
    drop(spool_dir, "sad.yaml", job)
    directory, status = wait_finished(spool_dir, "sad")
    assert directory == "failed" and status["state"] == "failed" and status["job_id"] == "sad"
    assert status["attempts"][0]["usage"]["source"] == "kernel"
    assert status["labels"] == {"***": "thi*** i*** ***"}, "the submitter's words: masked"
    (failed,) = r.wait_count(1)
    body = verify(failed, "s")
    assert (body["event"], body["state"], body["exit_code"]) == ("failed", "failed", 3)
    result = run_cli(spool_dir, "retry", "sad")
    assert result.returncode == 0, result.stderr
    assert verify(r.wait_count(2)[1], "s")["event"] == "retrying"


def test_on_a_polled_spool_a_delivery_committed_by_the_daemon_goes_out_at_once(
    start_daemon: StartDaemon, receiver: MakeReceiver, spool_dir: Path
) -> None:
    """With ``watch: poll`` (a network filesystem's spool: no watch of outbox/), a delivery the
    main process committed, a rejection or a job's acceptance, woke the sender, which looked
    at outbox/ only once ``poll_interval`` had passed: an hour here, a second by default.
    It is told the names now, as a watch would tell them."""
    r = receiver()
    # In before the daemon: its first sweep takes them (a polled incoming/ waits a poll too).
    drop(spool_dir, "broken.yaml", "job_id: [unclosed")
    drop(spool_dir, "told.yaml", local_job("told", "true", **hook(r.url, "s3cret", ["accepted"])))
    start_daemon(poll_interval="1h", watch="poll", rescan_interval="1h", settle_time="0s",
                 default_callback_url=r.url, default_callback_secret="s3cret")  # fmt: skip
    told = sorted(verify(each, "s3cret")["event"] for each in r.wait_count(2, bound=20))
    assert told == ["accepted", "rejected"]


def test_a_reloaded_poll_interval_reaches_the_callback_sender(
    start_daemon: StartDaemon, receiver: MakeReceiver, spool_dir: Path, tmp_path: Path
) -> None:
    """``poll_interval`` applies at once on SIGHUP, as the reload's log line says; the
    callback sender kept the one it started with. On a spool that is polled (a network
    filesystem's), what another process commits (the CLI's retry) waits for that poll: an
    hour here. Reloaded to 200 ms, it goes out. What the daemon's own processes commit is
    told to the sender (a worker process's by its message): a job's end goes out at once."""
    secret, gate = "s3cret-reloaded", tmp_path / "gate"
    r, seen = receiver(), receiver()
    settings = {"watch": "poll", "rescan_interval": "1h", "settle_time": "0s",
                "default_callback_url": seen.url, "default_callback_secret": "s3cret-default"}  # fmt: skip
    # Both in before the daemon, taken by its first sweep. The rejection is committed in the
    # main process, the job's end in a worker process; its retry's second attempt waits.
    drop(spool_dir, "broken.yaml", "job_id: [unclosed")
    script = f'[ "$SPOOLD_ATTEMPT" = 1 ] && exit 3; {gate_wait(gate)}'
    drop(spool_dir, "late.yaml", local_job("late", script,
                                           **hook(r.url, secret, ["failed", "retrying"])))  # fmt: skip
    daemon = start_daemon(poll_interval="1h", **settings)
    seen.wait_count(1)
    assert wait_finished(spool_dir, "late")[0] == "failed"
    (failed,) = r.wait_count(1)  # within the bound: no poll of the hour came
    assert verify(failed, secret)["event"] == "failed"
    try:
        assert run_cli(spool_dir, "retry", "late").returncode == 0
        wait_for(lambda: any(n.startswith("late~") for n in outbox(spool_dir)),
                 what="the retry's delivery in outbox/")  # fmt: skip
        assert len(r.received) == 1  # nothing lists outbox/ again within the hour but the reload
        assert daemon.process is not None
        write_config(tmp_path / "config.yaml", spool_dir, poll_interval="200ms", **settings)
        daemon.process.send_signal(signal.SIGHUP)
        assert verify(r.wait_count(2)[1], secret)["event"] == "retrying"
    finally:
        gate.touch()
    assert "applied poll_interval" in daemon.log()
