"""This host's heartbeat in hosts/<id>, and how it sees the other hosts sharing the spool.

Every ``heartbeat_interval`` the daemon rewrites its record with ``beat`` one higher, the jobs
it runs, and its view of every other host: ``alive`` while that host's beat moves, ``stale``
once it has stood still for ``lease_timeout`` by this host's monotonic clock, ``gone`` when
that host said it stopped. A command (``spoold hosts``, the API, the page) has no clock that
watched, so it shows a daemon's view (spoold.face.views.hosts_rows). Times written in a
record are for people: no host compares them with its own clock.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from spoold.core.clock import Clock, rfc3339
from spoold.core.config import Config
from spoold.core.procfs import Machine, this_machine
from spoold.core.sightings import Sightings
from spoold.core.spool import Spool
from spoold.core.spool.hosts import ALIVE, GONE, STALE

__all__ = ["ALIVE", "GONE", "STALE", "HostBeat"]
#: What a write answers on a full disk, over quota, or on a spool mounted read-only: a state
#: that lasts, said once (not a traceback every beat).
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class HostBeat:
    """Writes this host's record, watches the others'. Time is passed in; the caller waits."""

    def __init__(
        self, spool: Spool, config: Config, clock: Clock, logger: logging.Logger,
        *, running: Callable[[], Iterable[str]], version: str = "", machine: Machine | None = None,
    ) -> None:  # fmt: skip
        """``running``: the jobs this host runs now (for the record); ``machine``: where this
        daemon runs (default: ``this_machine()``)."""
        self._spool = spool
        self._config = config
        self._clock = clock
        self._logger = logger
        self._running = running
        self._version = version
        self._beat = 0
        self._started = rfc3339(clock.now())
        self._seen: Sightings[str] = Sightings()
        #: Each other host's daemon as this host saw it start (``up_for``).
        self._daemons: Sightings[str] = Sightings()
        self._up: dict[str, float] = {}
        self._view: dict[str, dict[str, Any]] = {}
        self._looked = False  # whether hosts/ was read yet
        self._next: float | None = None
        # Tells this daemon's record from another's of the same host id (a second machine
        # given this id): pids and start times can coincide across machines, this cannot.
        self._instance = os.urandom(8).hex()
        self._machine = machine or this_machine()
        #: Why this daemon must stop, once it found another daemon writing its record.
        self.taken: str | None = None
        self._written = False  # a record of this daemon's is in hosts/ (to read back)
        #: Another machine's record of this host id, as first seen and when (``waiting``).
        self._rival: tuple[tuple[object, ...], float] | None = None
        #: The errno this host's record last could not be written with (a full disk), said
        #: once; None while it is written.
        self._unwritten: int | None = None

    @property
    def next_due(self) -> float:
        """When ``tick`` has work next (monotonic); at once before the first beat."""
        return self._clock.monotonic() if self._next is None else self._next

    def tick(self, now: float) -> float:
        """Beat if due at ``now``; return when the next beat is due."""
        if self._next is None or now >= self._next:
            self._next = now + self._config.heartbeat_interval
            self.beat(now)
        return self._next

    def beat(self, now: float) -> None:
        """Look at the other hosts' records, then write this host's, one beat higher."""
        me = self._config.host_id
        records = self._spool.hosts.all()
        if (mine := records.get(me)) is not None and mine.get("instance") != self._instance:
            self._look_at_own(mine, now)
        if self.taken is not None or self.waiting:
            return  # not this daemon's record to write (yet, or any more)
        view: dict[str, dict[str, Any]] = {}
        for host, record in records.items():
            if host == me:
                continue
            view[host] = self._judge(host, record, now)
        self._seen.keep_only(records)
        self._daemons.keep_only(records)
        self._up = {host: up for host, up in self._up.items() if host in records}
        self._view, self._looked = view, True
        self._beat += 1
        try:
            self._spool.hosts.write(me, self._record(view, stopped=False))
        except OSError as exc:
            if exc.errno not in _FULL:
                raise
            self._cannot_write(exc)
            return
        if self._unwritten is not None:
            self._logger.warning("this host's beat is written to hosts/%s again", me)
            self._unwritten = None
        self._written = True

    def _cannot_write(self, exc: OSError) -> None:
        """A full disk, a quota, a read-only spool: one line when it starts (or changes), none
        at each beat after it: the daemon goes on, and other hosts may see this one stale
        once ``lease_timeout`` has passed. (Not an outage: the spool can be reached.)"""
        if exc.errno == self._unwritten:
            return
        self._unwritten = exc.errno
        self._logger.warning(
            "cannot write this host's beat to hosts/%s: %s; trying again every %gs (other "
            "hosts see this host stale after %gs)",
            self._config.host_id, exc.strerror or exc, self._config.heartbeat_interval,
            self._config.lease_timeout,
        )  # fmt: skip

    @property
    def waiting(self) -> bool:
        """Whether this daemon must not start yet: this host's record was written on another
        machine, not said stopped, and has not yet stood still for ``lease_timeout``."""
        return self._rival is not None and self.taken is None

    def _look_at_own(self, record: dict[str, Any], now: float) -> None:
        """This host's record, written by another daemon than this one. Once this daemon
        wrote its own, that is a second daemon serving as this host (two hosts given one
        host id: each would take the other's jobs for its own, and run them again): said in
        ``taken``, and the daemon stops. Before, it is an earlier daemon's: of this machine,
        gone (the host lock says so); of another, perhaps not: it is watched first, and this
        daemon starts only once it stood still for ``lease_timeout``."""
        if self._written:
            self._taken_by(record)
            return
        if record.get("stopped") or self._machine.relation(record) != "elsewhere":
            return
        seen = (record.get("beat"), record.get("instance"), record.get("pid"))
        if self._rival is None:
            self._rival = (seen, now)
            self._logger.warning(
                "this host's record (hosts/%s) was written on another machine (hostname %r, "
                "pid %s) that did not say it stopped: watching it for %gs before starting",
                self._config.host_id, record.get("hostname"), record.get("pid"),
                self._config.lease_timeout,
            )  # fmt: skip
        elif self._rival[0] != seen:
            self._taken_by(record)
        elif now - self._rival[1] >= self._config.lease_timeout:
            self._logger.info("hosts/%s stood still for %.0fs: starting",
                              self._config.host_id, now - self._rival[1])  # fmt: skip
            self._rival = None

    def _taken_by(self, record: dict[str, Any]) -> None:
        if self.taken is not None:
            return
        where = {"here": "on this machine", "before": "on this machine",
                 "elsewhere": "on another machine"}[self._machine.relation(record)]  # fmt: skip
        self.taken = (
            f"another spoold serves this spool as host {self._config.host_id!r} {where} "
            f"(hostname {record.get('hostname')!r}, pid {record.get('pid')}, started "
            f"{record.get('started_at')}): two hosts with one host id would run jobs twice; "
            "give each host its own RUNNER_ID"
        )

    def stopped(self) -> None:
        """Say that this host's daemon stopped: others call it gone, not stale."""
        if self.taken is not None:
            return  # the record is the other daemon's now: its word stands
        try:
            self._spool.hosts.write(self._config.host_id, self._record(self._view, stopped=True))
        except OSError as exc:  # a partition or a full disk: others will find it stale
            self._logger.warning("could not record this host's stop in hosts/: %s", exc)

    def state_of(self, host: str) -> str:
        """How this host sees ``host`` now: alive, stale or gone (this host itself: alive).
        A host with no record in hosts/ is gone (a command run where no daemon runs)."""
        if host == self._config.host_id:
            return ALIVE
        if (seen := self._view.get(host)) is None:
            return GONE if self._looked else ALIVE
        return str(seen["state"])

    def said_stopped(self, host: str) -> bool:
        """Whether ``host``'s record says its daemon stopped (``gone``): not a host whose
        record was removed (``spoold hosts --forget``), nor one found stale."""
        seen = self._view.get(host)
        return seen is not None and seen["state"] == GONE

    def up_for(self, host: str) -> float | None:
        """How long ``host``'s daemon has been the one seen in its record, as of this host's
        last beat (None: not seen). A daemon that starts again (after a stop or a crash) is
        given ``lease_timeout`` to adopt its jobs: their leases stood still while no daemon
        ran there, and would be taken over the moment its record stopped saying it stopped."""
        return self._up.get(host)

    def lost(self) -> frozenset[str]:
        """The other hosts this host sees stale or gone."""
        return frozenset(h for h, seen in self._view.items() if seen["state"] != ALIVE)

    def _judge(self, host: str, record: dict[str, Any], now: float) -> dict[str, Any]:
        # A restarted daemon counts from 0 again: its pid and start tell the new beat apart.
        seen = (record.get("beat"), record.get("pid"), record.get("started_at"))
        still = self._seen.unchanged_for(host, seen, now)
        daemon = (record.get("instance"), record.get("pid"), record.get("started_at"))
        self._up[host] = self._daemons.unchanged_for(host, daemon, now)
        if record.get("stopped"):
            state = GONE
        elif still >= self._config.lease_timeout:
            state = STALE
        else:
            state = ALIVE
        if state != (old := self._view.get(host, {}).get("state", ALIVE)):
            log = self._logger.warning if state == STALE else self._logger.info
            log("host %s is %s (was %s; its beat %s unchanged for %.0fs by this host's clock)",
                host, state, old, record.get("beat"), still)  # fmt: skip
        return {"state": state, "beat": record.get("beat"), "unchanged_for": round(still, 1)}

    def _record(self, view: dict[str, dict[str, Any]], *, stopped: bool) -> dict[str, Any]:
        return {
            "host": self._config.host_id,
            "hostname": self._config.hostname,
            "pid": os.getpid(),
            "beat": self._beat,
            "started_at": self._started,
            "written_at": rfc3339(self._clock.now()),  # for people: never compared
            "heartbeat_interval": self._config.heartbeat_interval,
            "lease_timeout": self._config.lease_timeout,
            "running": [] if stopped else sorted(self._running()),
            "stopped": stopped,
            "version": self._version,
            "view": view,
            "instance": self._instance,
            **self._machine.fields(),
        }
