"""Three spoold hosts on one spool over a real network filesystem (SPEC section 11): sshfs from
three network namespaces (tests/netbed.py), 1000 jobs, and during the run one host killed with
``kill -9``, one frozen past its lease and thawed, one cut off the network past its lease and
put back. Afterwards: every job in exactly one terminal directory, none run twice beyond what
its ``on_interrupt`` allows, nothing written into a job's record by a host after it was fenced,
every final callback delivered, every firing of a schedule made once.
"""

from __future__ import annotations

import collections
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from spoold.core.clock import parse_rfc3339
from spoold.core.spool import Spool, fs
from spoold.core.spool.fs import rename_noreplace
from spoold.schedule.triggers import run_id
from tests.harness import gate_wait, local_job, run_cli, wait_finished, wait_for, write_config
from tests.netbed import Bed, Host, make_bed
from tests.test_hosts import replaced_only_while_there

JOBS = 1000
LONG_EVERY = 10  # every tenth job runs ~3 s: some are always under way when a host goes
LEASE_TIMEOUT = 6.0  # above heartbeat (1 s) + the mount's dead-connection time (~3-4 s)
RUN_BOUND = 480.0  # a ceiling for the whole run, not a measurement
SCHEDULE = "tick"
SECRET = "s3cret"
TERMINAL = ("done", "failed")
FINAL_EVENTS = {"succeeded", "failed", "cancelled"}


def _config(bed: Bed, host: Host) -> Path:
    return write_config(
        bed.root / f"config-{host.name}.yaml", host.spool,
        workers=4, watch="poll", poll_interval="200ms", rescan_interval="1s", settle_time="0.1s",
        lease_timeout=f"{LEASE_TIMEOUT:g}s", heartbeat_interval="1s", kill_grace="1s",
        shutdown_grace="2s", default_callback_url=host.callback_url,
        default_callback_secret=SECRET, logdir=str(bed.root / "logs" / host.name),
    )  # fmt: skip


def _job(n: int, runs: Path) -> dict[str, Any]:
    """Job ``n``: it leaves a mark for each start (which host, which attempt), and a line
    naming its host and attempt in its log; every tenth runs ~3 s."""
    mark = f'touch "{runs}/$SPOOLD_JOB_ID.$SPOOLD_ATTEMPT.$RUNNER_ID.$$"'
    ticks = 15 if n % LONG_EVERY == 0 else 1
    body = f'for i in $(seq {ticks}); do echo "tick $RUNNER_ID $SPOOLD_ATTEMPT"; sleep 0.2; done'
    return {
        "job_id": f"j{n:04d}", "executor": "local",
        "product": {"commands": f"{mark}; {body}"},
        "on_interrupt": "requeue" if n % 2 else "fail",
    }  # fmt: skip


def _drop(server: Path, name: str, document: dict[str, Any]) -> None:
    """As a backend writing on the file server: written aside, renamed into place."""
    temporary = server / "incoming" / f".{name}.part"
    temporary.write_text(yaml.safe_dump(document))
    os.rename(temporary, server / "incoming" / name)


def _where(server: Path) -> dict[str, list[str]]:
    """Every job id, with each directory it is found in (the server's own view)."""
    found: dict[str, list[str]] = collections.defaultdict(list)
    for directory in ("pending", "running", *TERMINAL):
        for name in os.listdir(server / directory):
            if not name.startswith("."):
                found[name].append(directory)
    return found


def _finished(server: Path) -> int:
    """How many of the jobs (not the schedule's runs) have ended."""
    return sum(n.startswith("j") for d in TERMINAL for n in os.listdir(server / d))


@pytest.fixture(name="bed")
def bed_fixture() -> Iterator[Bed]:
    """Three hosts, for this test alone: its teardown ends the hosts' daemons, and with them
    their connections to the receiver, whose handler threads then end too."""
    with make_bed(hosts=3) as bed:
        yield bed


# ~95 s alone; a CI machine running the suite two at a time, at half its speed (seen), took
# over the suite's 300 s: the test's own waits (RUN_BOUND each) are what bound it.
@pytest.mark.timeout(2 * RUN_BOUND)
def test_a_thousand_jobs_over_three_hosts_one_killed_one_frozen_one_cut_off(bed: Bed) -> None:
    server = bed.server_spool
    assert run_cli(server, "init").returncode == 0
    runs = bed.root / "runs"
    runs.mkdir(mode=0o777)
    runs.chmod(0o777)  # the jobs run as the job user
    h1, h2, h3 = bed.hosts
    for host in bed.hosts:
        host.start_daemon(_config(bed, host))
    _drop(server, f"{SCHEDULE}.yaml", {
        "job_id": SCHEDULE, "executor": "local", "product": {"commands": "true"},
        "schedule": {"every": "1s", "overlap": "allow", "catch_up": "all"},
    })  # fmt: skip
    dropping = threading.Thread(target=_drop_all, args=(server, runs), daemon=True)
    dropping.start()
    events: list[str] = []

    def when_finished(count: int, what: str, act: Callable[[], object]) -> None:
        wait_for(lambda: _finished(server) >= count, bound=RUN_BOUND, what=f"{count} finished")
        act()
        events.append(f"{what} at {_finished(server)} finished")

    when_finished(150, "h1 killed", h1.kill9)
    when_finished(300, "h2 frozen", h2.freeze)
    time.sleep(LEASE_TIMEOUT + 4)  # past its lease, by the other hosts' clocks
    h2.thaw()
    events.append("h2 thawed")
    when_finished(550, "h3 cut off", h3.cut)
    time.sleep(LEASE_TIMEOUT + 4)
    h3.restore()
    events.append("h3 restored")
    when_finished(700, "h1 started again", lambda: h1.start_daemon(_config(bed, h1)))
    dropping.join(RUN_BOUND)
    try:
        wait_for(lambda: _finished(server) >= JOBS, bound=RUN_BOUND, what="every job to end")
    except AssertionError as exc:
        logs = {h.name: h.daemon.log() for h in bed.hosts if h.daemon}
        raise AssertionError(f"{exc}\n{_unfinished(server, logs, events)}") from None
    assert run_cli(server, "unschedule", SCHEDULE).returncode == 0
    wait_for(lambda: not any(n.startswith(SCHEDULE + "@")
                             for d in ("pending", "running") for n in os.listdir(server / d)),
             bound=RUN_BOUND, what="the schedule's last runs")  # fmt: skip
    logs = {h.name: h.daemon.log() for h in bed.hosts if h.daemon}
    context = f"{events}\n" + "\n".join(f"--- {name}\n{log[-3000:]}" for name, log in logs.items())
    # A spool cut off is said once per part and return, not as a traceback at every round
    # of the parts that go round (duties, intake, sender, slots).
    rounds = ("periodic duty", "intake failed", "callback sender", "worker failed on job")
    cut_off = {name: [t for t in _tracebacks(log) if ("Errno 5]" in t or "Errno 107]" in t)
                      and any(part in t.split("\n", 1)[0] for part in rounds)]
               for name, log in logs.items()}  # fmt: skip
    assert all(not found for found in cut_off.values()), json.dumps(cut_off)[:4000]

    # Every job in exactly one terminal directory; nothing rejected, pending or running.
    where = _where(server)
    jobs = {job_id: dirs for job_id, dirs in where.items() if not job_id.startswith(SCHEDULE)}
    assert len(jobs) == JOBS, context
    assert {job_id: d for job_id, d in jobs.items() if len(d) != 1 or d[0] not in TERMINAL} == {}
    assert os.listdir(server / "rejected") == [], _rejections(server, logs, events)

    # None run more often than its attempts record (on_interrupt: fail: once at most).
    marks: dict[str, list[str]] = collections.defaultdict(list)
    for name in os.listdir(runs):
        marks[name.split(".", 1)[0]].append(name)
    taken_over = 0
    late: list[str] = []
    for job_id, (directory,) in jobs.items():
        status = json.loads((server / directory / job_id / "status.json").read_text())
        started = marks.get(job_id, [])
        assert len(started) <= len(status["attempts"]), (job_id, started, status["attempts"])
        if int(job_id[1:]) % 2 == 0:  # on_interrupt: fail
            assert len(started) <= 1, (job_id, started)
        log = (server / directory / job_id / "log").read_text(errors="replace")
        late += _fenced_writes(job_id, log)
        taken_over += "taken over by host" in log
    assert late == [], context
    assert taken_over > 0, f"no takeover happened: the test proves nothing\n{context}"

    # Every job's final callback delivered (to whichever host's address sent it).
    finals = {body["job_id"] for body in bed.receiver.bodies() if body["event"] in FINAL_EVENTS}
    missing = set(jobs) - finals
    if missing:  # the last ones may still be on their way
        try:
            wait_for(lambda: not set(jobs) - {b["job_id"] for b in bed.receiver.bodies()
                                               if b["event"] in FINAL_EVENTS},
                     bound=60.0, what=f"final callbacks of {sorted(missing)[:5]}")  # fmt: skip
        except AssertionError as exc:
            still = set(jobs) - {b["job_id"] for b in bed.receiver.bodies()
                                 if b["event"] in FINAL_EVENTS}  # fmt: skip
            logs = {h.name: h.daemon.log() for h in bed.hosts if h.daemon}  # as they are now
            raise AssertionError(
                f"{exc}: {len(still)} missing\n{_outbox_of(server, still, bed)}\n"
                + "\n".join(_said_about(logs, still)[-20:] + _said_of_callbacks(logs))
            ) from None
    # Each firing of the schedule made once: one run, one "accepted" delivery.
    fired = sorted(job_id for job_id in where if job_id.startswith(SCHEDULE + "@"))
    assert len(fired) >= 10, fired
    # (A delivery may reach the receiver twice, an answer lost to a cut: it is the same
    # delivery, which the receiver dedupes by its id; two deliveries would be two firings.)
    accepted = collections.Counter(
        body["job_id"] for body in {b["delivery_id"]: b for b in bed.receiver.bodies()}.values()
        if body["event"] == "accepted" and body["job_id"].startswith(SCHEDULE + "@")
    )  # fmt: skip
    assert {run for run, count in accepted.items() if count != 1} == set(), accepted
    # And one run per firing, named by it: hosts that each made a run of one firing under a
    # name of their own would pass the count above.
    firings: dict[str, list[str]] = collections.defaultdict(list)
    for run in fired:
        (directory,) = where[run]
        # A takeover's copy of the log keeps its lines (fenced-log.<gen> repeats them).
        text = (server / directory / run / "log").read_text(errors="replace")
        (when,) = re.findall(rf"firing at (\S+) of schedule {SCHEDULE}$", text, re.MULTILINE)
        firings[when].append(run)
        assert run == run_id(SCHEDULE, parse_rfc3339(when)), (run, when)
    assert {when: made for when, made in firings.items() if len(made) != 1} == {}, firings
    # Every host alive again, as each of them sees the others.
    for host in bed.hosts:
        shown = run_cli(host.spool, "hosts", "--json", "--config", str(_config(bed, host)),
                        env={"RUNNER_ID": host.name})  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        states = {row["host"]: row["state"] for row in json.loads(shown.stdout)}
        assert states == {"h1": "alive", "h2": "alive", "h3": "alive"}, (host.name, states)


def _unfinished(server: Path, logs: dict[str, str], events: list[str]) -> str:
    """The jobs that have not ended, where each is, its record, and what the hosts said of it
    (seen once under a loaded suite, not alone: a name to go by is not enough)."""
    said = [str(events)]
    where = _where(server)
    stuck = sorted(job_id for job_id, dirs in where.items()
                   if not job_id.startswith(SCHEDULE) and not set(dirs) & set(TERMINAL))  # fmt: skip
    missing = sorted({f"j{n:04d}" for n in range(JOBS)} - set(where))
    said.append(f"not ended: {len(stuck)} {stuck[:20]}; found nowhere: {missing[:20]}")
    said.append(f"incoming/: {sorted(os.listdir(server / 'incoming'))[:20]}")
    said.append(f"tmp/: {sorted(os.listdir(server / 'tmp'))[:20]}")
    if missing:  # a job found nowhere was never accepted, or is lost: which, and what was said
        said.append(_rejections(server, logs, []))
        said += _said_about(logs, set(missing[:5]))[-30:]
    for job_id in stuck[:5]:
        for directory in where[job_id]:
            job = server / directory / job_id
            for record in sorted(job.iterdir()):
                if record.is_file() and record.name != "job.yaml":
                    said.append(f"{directory}/{job_id}/{record.name}: {record.read_text()[-1500:]}")
        said += _said_about(logs, {job_id})[-30:]
    said += [f"--- {host}\n{log[-4000:]}" for host, log in logs.items()]
    return "\n".join(said)


def _outbox_of(server: Path, job_ids: set[str], bed: Bed) -> str:
    """What outbox/ holds of these jobs (each delivery's host, event, tries, next try, last
    error), and what the receiver got of them: where a missing callback is stuck."""
    said = []
    for directory in ("", "failed"):
        try:
            names = sorted(os.listdir(server / "outbox" / directory))
        except FileNotFoundError:  # outbox/failed/ is made with its first delivery given up
            continue
        said.append(f"outbox/{directory}: {len(names)} entries")
        for name in names:
            if name.split("~", 1)[0] not in job_ids or len(said) > 40:
                continue
            try:
                record = json.loads((server / "outbox" / directory / name).read_text())
            except (OSError, ValueError) as exc:
                said.append(f"  {name}: unreadable ({exc})")
                continue
            fields = ("host", "event", "tries", "next_try", "created", "last_error")
            said.append(f"  {name}: { ({k: record.get(k) for k in fields}) }")
    got = collections.Counter(
        (b["job_id"], b["event"]) for b in bed.receiver.bodies() if b["job_id"] in job_ids
    )  # fmt: skip
    said.append(f"received of them: {sorted(got.items())[:20]}; now {time.time():.0f}")
    return "\n".join(said)


def _said_of_callbacks(logs: dict[str, str]) -> list[str]:
    """Each host's last lines about callbacks, its sender, or the spool's reach."""
    words = ("callback", "deliver", "outbox", "spool cannot be reached", "spool is back")
    return [
        line
        for host, log in logs.items()
        for line in [f"  {host}: {x}" for x in log.splitlines() if any(w in x for w in words)][-15:]
    ]


def _rejections(server: Path, logs: dict[str, str], events: list[str]) -> str:
    """What was rejected, why, and every line any host said about those files or their jobs
    (a rejection here is a rare race: its one sighting left only a name to go by)."""
    said = [str(events)]
    for name in sorted(os.listdir(server / "rejected")):
        reason = server / "rejected" / name / "reason.json"
        said.append(f"{name}: {reason.read_text() if reason.exists() else 'no reason.json'}")
        said += _said_about(logs, {name, name.split("-", 1)[0].split(".", 1)[0]})  # j0653 too
    return "\n".join(said)


def _said_about(logs: dict[str, str], words: set[str]) -> list[str]:
    """Every line of the hosts' logs that names one of ``words``, with its host."""
    return [f"  {host}: {line}" for host, log in logs.items() for line in log.splitlines()
            if any(word in line for word in words)]  # fmt: skip


def _drop_all(server: Path, runs: Path) -> None:
    """The jobs, in ten batches a second apart: intake goes on while hosts come and go."""
    for batch in range(10):
        for n in range(batch * JOBS // 10, (batch + 1) * JOBS // 10):
            _drop(server, f"j{n:04d}.yaml", _job(n, runs))
        time.sleep(1.0)


def test_a_move_cut_between_its_link_and_its_unlink_is_finished_on_sshfs(bed: Bed) -> None:
    """The thousand jobs above once ended with ``rejected/j0650-2.yaml``: a job file given back
    to incoming/ by two hosts at once (the stale host's release, the recovery of its stage by
    another), each moving it by a link and an unlink, sshfs having no RENAME_NOREPLACE. The
    second link found the first's and took a free name beside it: both names were taken, the
    second rejected as a duplicate. A target that is the very file finishes the move; on
    sshfs, which numbers each name as a node of its own and says each has one link, that is
    told by everything the two names show, bytes included."""
    h1, h2 = bed.host(1), bed.host(2)
    assert run_cli(bed.server_spool, "init").returncode == 0
    mine, other = Spool(h1.spool, host="h1"), Spool(h2.spool, host="h2")
    incoming = h1.spool / "incoming"
    (incoming / "j.yaml").write_text("job_id: j\nexecutor: local\n")
    taken = mine.stages.take_incoming("j.yaml", now=time.time(), max_size=1 << 20)
    assert taken is not None
    os.link(taken.original, incoming / "j.yaml")  # h1's release, cut after its link
    assert not os.path.samestat(os.lstat(taken.original), os.lstat(incoming / "j.yaml"))
    (line,) = other.stages.recover(frozenset({"h1"}))
    assert "returned j.yaml to incoming/ as j.yaml" in line, line
    assert os.listdir(bed.server_spool / "incoming") == ["j.yaml"]
    assert os.stat(bed.server_spool / "incoming" / "j.yaml").st_nlink == 1
    # Two files alike in all but their bytes are two files: the second gets a name of its own.
    (incoming / "k.yaml").write_text("job_id: k\nexecutor: local\n")
    taken = mine.stages.take_incoming("k.yaml", now=time.time(), max_size=1 << 20)
    assert taken is not None
    (incoming / "k.yaml").write_text("job_id: K\nexecutor: local\n")
    os.utime(incoming / "k.yaml", ns=(0, os.lstat(taken.original).st_mtime_ns))
    os.chmod(incoming / "k.yaml", os.lstat(taken.original).st_mode)
    (line,) = other.stages.recover(frozenset({"h1"}))
    assert "returned k.yaml to incoming/ as k-2.yaml" in line, line
    # The move itself, half done (the file under both names): finished, the first name gone
    # (above, the stage's removal took that name with it, whatever the move left).
    half, whole = h1.spool / "tmp" / "half.yaml", h1.spool / "tmp" / "whole.yaml"
    half.write_text("job_id: h\n")
    os.link(half, whole)
    rename_noreplace(half, whole)
    assert not half.exists() and whole.read_text() == "job_id: h\n"
    assert os.listdir(bed.server_spool / "tmp").count("half.yaml") == 0


def test_a_stage_with_fuses_stand_in_for_the_submitted_file_gives_back_the_job_on_sshfs(
    bed: Bed,
) -> None:
    """The thousand jobs above once lost j0941: found nowhere, and in incoming/ a file named
    ``.fuse_hidden000027ce00000003``. A file replaced while its host holds it open is moved
    aside by FUSE (sshfs's libfuse, without ``hard_remove``) under such a name until the last
    close. Here a reader on h1 (``less``, a backup) holds the submitted file open as h1 takes
    it: spoold's copy replaces it in the stage, and the original stays beside it as a stand-in
    (for good had h1 been cut off before that close). h2, recovering h1's stage, gave the
    stand-in back (its name sorts first) and deleted the job file with the stage."""
    h1, h2 = bed.host(1), bed.host(2)
    assert run_cli(bed.server_spool, "init").returncode == 0
    mine, other = Spool(h1.spool, host="h1"), Spool(h2.spool, host="h2")
    job = b"job_id: j\nexecutor: local\nproduct: {commands: 'true'}\n"
    (bed.server_spool / "incoming" / "j.yaml").write_bytes(job)
    reader = os.open(h1.spool / "incoming" / "j.yaml", os.O_RDONLY)
    try:
        taken = mine.stages.take_incoming("j.yaml", now=time.time(), max_size=1 << 20)
        assert taken is not None
        stage = bed.server_spool / "tmp" / taken.stage.name
        hidden = [n for n in os.listdir(stage) if n.startswith(".fuse_hidden")]
        assert len(hidden) == 1, os.listdir(stage)
        assert (stage / hidden[0]).read_bytes() == job
        (line,) = other.stages.recover(frozenset({"h1"}))
    finally:
        os.close(reader)
    assert "returned j.yaml to incoming/ as j.yaml" in line, line
    assert os.listdir(bed.server_spool / "incoming") == ["j.yaml"]
    assert (bed.server_spool / "incoming" / "j.yaml").read_bytes() == job
    # h1's own release (its intake failed) while the reader still has the file: the stand-in,
    # hidden again as the stage is removed (ENOTEMPTY), is never given back in its turn (a
    # second copy of the job, rejected as a duplicate once the first is accepted).
    reader = os.open(h1.spool / "incoming" / "j.yaml", os.O_RDONLY)
    try:
        taken = mine.stages.take_incoming("j.yaml", now=time.time(), max_size=1 << 20)
        assert taken is not None
        assert "returned j.yaml to incoming/ as j.yaml" in mine.stages.release(taken)
        os.rename(bed.server_spool / "incoming" / "j.yaml", bed.server_spool / "taken.yaml")
        for _ in range(3):  # tried again, as intake does at each sweep until it works
            mine.stages.release(taken)
        # Left as one of spoold's own: another host removes it, and gives nothing back.
        (line,) = other.stages.recover(frozenset({"h1"}))
        assert "a stage of spoold's own (nothing to give back)" in line, line
        assert os.listdir(bed.server_spool / "incoming") == []
    finally:
        os.close(reader)


def test_a_write_of_an_existing_file_never_makes_it_again_on_sshfs(bed: Bed) -> None:
    """An outbox delivery removed by hand (or adopted by another host) while a failed try of
    it was being recorded is not written back: on sshfs too, whatever it does with
    RENAME_EXCHANGE."""
    h1 = bed.host(1)
    assert run_cli(bed.server_spool, "init").returncode == 0
    directory = h1.spool / "tmp" / "existing"
    directory.mkdir()
    replaced_only_while_there(directory)


def test_a_cut_off_host_ends_a_job_it_would_run_twice_before_another_takes_it_over(
    bed: Bed,
) -> None:
    """A job with ``on_interrupt: requeue`` on a host cut off from the spool past its lease: its
    taker runs it again. The cut-off host's copy ran on until the link came back (its
    supervisor saw the fence only then): two copies of one job at once. Now that supervisor
    ends it first, once the spool has been out of its reach for what the lease leaves."""
    h1, h2 = bed.host(1), bed.host(2)
    server = bed.server_spool
    assert run_cli(server, "init").returncode == 0
    marks, gate = bed.root / "marks", bed.root / "gate"
    marks.mkdir(mode=0o777)
    marks.chmod(0o777)  # the job runs as the job user
    lease = 10.0  # the copy ends 6 s (10 - 3 beats - kill_grace) after its beat last moved
    configs = {
        host.name: write_config(
            bed.root / f"cut-{host.name}.yaml",
            host.spool,
            watch="poll",
            poll_interval="200ms",
            rescan_interval="1s",
            lease_timeout=f"{lease:g}s",
            heartbeat_interval="1s",
            kill_grace="1s",
            logdir=str(bed.root / "logs" / host.name),
        )
        for host in (h1, h2)
    }
    stamp = f'$(date +%s.%N) >> "{marks}/$RUNNER_ID"'
    commands = (
        f"echo start {stamp}; trap 'echo end {stamp}; exit 143' TERM; "
        f"{gate_wait(gate, bound=120)} & wait"
    )
    h1.start_daemon(configs["h1"])
    h2.start_daemon(configs["h2"])
    # h1 sees h2 (its record's view says so) before the job starts, which h2 sits out frozen.
    record = server / "hosts" / "h1"
    wait_for(lambda: "h2" in (fs.read_json(str(record)) or {}).get("view", {}),
             what="h1 to see h2")  # fmt: skip
    h2.freeze()
    try:
        _drop(server, "twice.yaml", local_job("twice", commands, on_interrupt="requeue"))
        wait_for((marks / "h1").exists, what="the job to start on h1")
    finally:
        h2.thaw()
    h1.cut()
    try:
        wait_for((marks / "h2").exists, bound=60, what="h2 to take the job over and run it")
        h2_start = float((marks / "h2").read_text().split()[1])
        h1_lines = (marks / "h1").read_text().split("\n")
        ends = [float(line.split()[1]) for line in h1_lines if line.startswith("end ")]
        assert ends, f"h1's copy still ran when h2 started the job: {h1_lines}"
        assert ends[0] < h2_start, (ends, h2_start)
        print(f"FACT cut-off: h1's copy ended {h2_start - ends[0]:.2f} s before h2 started it")
    finally:
        h1.restore()
    gate.touch()
    where, status = wait_finished(server, "twice", bound=60)
    assert where == "done", status
    assert status["worker"].startswith("h2"), status
    log = (server / "done" / "twice" / "log").read_text()
    assert "taken over by host h2 from host h1" in log, log


def test_a_job_a_cut_off_host_ended_goes_back_to_pending_if_the_spool_returns_first(
    bed: Bed,
) -> None:
    """The same end, the spool back before any host took the job over (here no daemon runs
    on h9, whose record only says it served the spool: stale, it may come back): the host
    that ended its copy records the interruption itself, and ``on_interrupt: requeue`` runs
    the job again."""
    h1 = bed.host(1)
    server = bed.server_spool
    assert run_cli(server, "init").returncode == 0
    (server / "hosts" / "h9").write_text(json.dumps({"host": "h9", "beat": 1, "stopped": False}))
    marks = bed.root / "marks"
    marks.mkdir(mode=0o777)
    marks.chmod(0o777)  # the job runs as the job user
    config = write_config(
        bed.root / "alone.yaml", h1.spool, watch="poll", poll_interval="200ms",
        rescan_interval="1s", lease_timeout="10s", heartbeat_interval="1s", kill_grace="1s",
        logdir=str(bed.root / "logs" / "h1"),
    )  # fmt: skip
    stamp = f'$SPOOLD_ATTEMPT $(date +%s.%N) >> "{marks}/$RUNNER_ID"'
    commands = (
        f"echo start {stamp}; trap 'echo end {stamp}; exit 143' TERM; "
        '[ "$SPOOLD_ATTEMPT" -gt 1 ] || { sleep 120 & wait; }'
    )
    h1.start_daemon(config)
    _drop(server, "back.yaml", local_job("back", commands, on_interrupt="requeue"))
    wait_for((marks / "h1").exists, what="the job to start on h1")
    h1.cut()
    try:
        wait_for(lambda: "end 1 " in (marks / "h1").read_text(), bound=60,
                 what="h1's copy to end, cut off")  # fmt: skip
    finally:
        h1.restore()
    where, status = wait_finished(server, "back", bound=60)
    assert (where, status["state"]) == ("done", "succeeded"), status
    first = status["attempts"][0]
    assert first["error"].startswith("interrupted: the spool was out of reach"), first
    assert "start 2 " in (marks / "h1").read_text()


TAKEN = re.compile(r"taken over by host (\S+) from host (\S+) \(claim generation (\d+)")
TICK = re.compile(r"^.*tick (\S+) (\d+)$")


def _fenced_writes(job_id: str, log: str) -> list[str]:
    """Lines in a job's log written by a host for an attempt after that attempt's claim was
    taken from it: what fencing must prevent."""
    fenced: set[tuple[str, str]] = set()  # (host, attempt) whose claim was taken over
    attempt = "0"
    found = []
    for line in log.splitlines():
        if (started := re.search(r"attempt (\d+) started on", line)) is not None:
            attempt = started.group(1)
        if (taken := TAKEN.search(line)) is not None:
            fenced.add((taken.group(2), attempt))
        elif (tick := TICK.match(line)) is not None and (tick[1], tick[2]) in fenced:
            found.append(f"{job_id}: {line}")
    return found


def _tracebacks(log: str) -> list[str]:
    """Each traceback in a daemon's log, with the line that introduced it."""
    lines = log.splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.strip().startswith("Traceback"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j][:4] != "    "), i)
            found.append("\n".join(lines[max(i - 1, 0) : end + 1]))
    return found
