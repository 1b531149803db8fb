"""outbox/: the deliveries of callbacks, as files.

A delivery is outbox/<key>~<sequence>.json. It is written as .prepared, and fsynced with
outbox/, before the state change it tells of, and renamed to .json once that change is made:
see ``spoold.out.outbox`` for how a delivery becomes part of its state change, and how a
prepared one a crash left is decided. Deliveries given up are moved into outbox/failed/.

Several hosts sharing the spool: a delivery names the host that wrote it, and only that host
sends it while it is alive. A stale host's deliveries are adopted, one host winning each
(``adopt``: renamed aside, which only one rename can do, then written back under the new
host's name).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from typing import Any

from spoold.core.errors import JobBusy, SpoolError
from spoold.core.spool.fs import (
    DEFAULT_MODE,
    TEMP_MARK,
    DirStamp,
    GroupCommit,
    json_bytes,
    link_into_place,
    path_stamp,
    read_json,
    write_file,
    write_new,
)

__all__ = ["Deliveries", "is_delivery"]

_PREPARED = ".prepared"  # an outbox delivery whose state change is not made yet
_ADOPTING = ".adopt-"  # .adopt-<host>-<name>: a delivery being adopted by <host>


def is_delivery(name: str) -> bool:
    """Whether a name in outbox/ is a delivery's (prepared or committed): not failed/, nor a
    writer's temporary file, nor one put aside while a host adopts it."""
    return "~" in name and name[0] != "."


def committed_name(prepared: str) -> str:
    """The name a prepared delivery has once committed."""
    if not prepared.endswith(_PREPARED):
        raise SpoolError(f"{prepared!r} is not a prepared delivery")
    return prepared[: -len(_PREPARED)] + ".json"


class Deliveries:
    """The outbox: deliveries prepared, committed, listed, retried, acknowledged, given up."""

    def __init__(self, dirs: Mapping[str, str], disk: GroupCommit) -> None:
        self._dirs = dirs
        self._disk = disk

    def prepare(self, key: str, sequence: int, data: bytes, *, exclusive: bool = False) -> str:
        """Write a delivery that is not valid yet, durably; return its name.

        A leftover of that name is replaced (its change was never made). With ``exclusive``
        (a job's first event), nothing is: FileExistsError if that delivery is committed
        (another job of that id, even one accepted by another host a moment ago, owns it);
        JobBusy if it is only prepared, a change of that id under way (another host's intake
        of a file of that id, or a stale host's late one) that may yet be dropped.
        """
        outbox = self._dirs["outbox"]
        name = f"{key}~{sequence:08d}"
        path = f"{outbox}/{name}{_PREPARED}"
        committed = f"{outbox}/{name}.json"
        if not exclusive:
            write_file(path, data, durable=self._disk.durable)
        else:
            temp = f"{outbox}/{TEMP_MARK}{name}.{os.urandom(4).hex()}.tmp"
            write_new(temp, data, durable=self._disk.durable)
            if not link_into_place(temp, path):  # unlike a rename, never replaces
                if os.path.exists(committed):
                    raise FileExistsError(committed)
                raise JobBusy(
                    f"another change of job {key!r} is under way ({name}{_PREPARED} is "
                    "prepared, not decided yet)"
                )
            if os.path.exists(committed):
                os.unlink(path)
                raise FileExistsError(committed)
        self._disk.sync(outbox)
        return name + _PREPARED

    def commit(self, name: str, data: bytes | None = None) -> bool:
        """Make a prepared delivery valid; False if it is not there (committed or discarded).

        ``data``: its content, from the writer that made the change. Another host that took
        this one for stale may have dropped it as a change not made: the writer knows better,
        and writes it again (a receiver dedupes by ``delivery_id`` should it come twice)."""
        outbox = self._dirs["outbox"]
        committed = f"{outbox}/{committed_name(name)}"
        try:
            os.rename(f"{outbox}/{name}", committed)
        except FileNotFoundError:
            if data is None:
                return False
            temporary = f"{outbox}/{TEMP_MARK}{name}.{os.urandom(4).hex()}.tmp"
            write_new(temporary, data, durable=self._disk.durable)
            if not link_into_place(temporary, committed):
                return False  # committed by whoever found it made
            self._disk.sync(outbox)
        return True

    def names(self, directory: str = "") -> list[str]:
        """The deliveries waiting (or, with ``directory="failed"``, given up), in key order."""
        # Names alone: the sender lists a backlog of thousands after every delivery.
        try:
            names = os.listdir(os.path.join(self._dirs["outbox"], directory))
        except FileNotFoundError:
            return []
        names = [n for n in names if is_delivery(n)]
        names.sort()
        return names

    def read(self, name: str, directory: str = "") -> dict[str, Any] | None:
        """A delivery's content; None once it is gone."""
        return read_json(os.path.join(self._dirs["outbox"], directory, name))

    def stamp(self, name: str) -> DirStamp | None:
        """What changes whenever ``name`` is written: every write replaces the file by a new
        one (``write_file``, ``adopt``), so a record read under a stamp is still the file's
        while the stamp is the same. None once it is gone."""
        return path_stamp(os.path.join(self._dirs["outbox"], name))

    def directory_stamp(self) -> DirStamp | None:
        """outbox/'s own stamp: a delivery prepared, committed, written (each write replaces its
        file), put aside, given up or removed changes it. None if outbox/ is gone."""
        return path_stamp(self._dirs["outbox"])

    def exists(self, name: str) -> bool:
        """Whether outbox/ holds ``name`` now (one that ``read`` cannot read is damaged, not
        one a host adopting it has put aside for a moment)."""
        return os.path.lexists(os.path.join(self._dirs["outbox"], name))

    def update(self, name: str, data: bytes) -> None:
        """Record a delivery's failed tries. Not fsynced: a lost update only means a sooner try.

        FileNotFoundError if it is gone meanwhile (removed by hand while a try was under way,
        or adopted by another host that found this one stale): it is not written back.
        """
        write_file(f"{self._dirs['outbox']}/{name}", data, durable=False, existing=True)

    def remove(self, name: str) -> None:
        """Drop a delivery: acknowledged, or a prepared one whose state change never happened."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self._dirs['outbox']}/{name}")

    def resend(self, name: str, now: float) -> bool:
        """A delivery given up, back into outbox/ to be tried again from now (its tries and its
        time to give up begin anew); False if it is not in outbox/failed/."""
        record = self.read(name, "failed")
        if record is None:
            return False
        record = {**record, "tries": 0, "next_try": None, "created": now, "resent_at": now}
        write_file(f"{self._dirs['outbox']}/{name}", json_bytes(record), durable=self._disk.durable)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self._dirs['outbox']}/failed/{name}")
        self._disk.sync(self._dirs["outbox"])
        return True

    def give_up(self, name: str) -> None:
        """Move a delivery that will not be tried again into outbox/failed/."""
        failed = f"{self._dirs['outbox']}/failed"
        with contextlib.suppress(FileExistsError):
            os.mkdir(failed, DEFAULT_MODE)
        os.replace(f"{self._dirs['outbox']}/{name}", f"{failed}/{name}")
        self._disk.sync(self._dirs["outbox"])

    def adopt(self, name: str, host: str, update: Callable[[dict[str, Any]], bytes]) -> bool:
        """Take over a delivery another host wrote, for ``host`` (``update`` makes its new
        content); False if another host took it first, or it was delivered meanwhile."""
        outbox = self._dirs["outbox"]
        aside = f"{outbox}/{_ADOPTING}{host}-{name}"
        try:
            os.rename(f"{outbox}/{name}", aside)  # of hosts adopting at once, one wins
        except FileNotFoundError:
            return False
        record = read_json(aside)
        if record is None:  # not whole: back where it was, for its writer
            os.rename(aside, f"{outbox}/{name}")
            return False
        write_file(f"{outbox}/{name}", update(record), durable=self._disk.durable)
        os.unlink(aside)
        return True

    def finish_adoptions(self, hosts: frozenset[str]) -> int:
        """Put back the deliveries these hosts were adopting when they stopped (this host at
        start, or hosts found stale); return how many."""
        outbox = self._dirs["outbox"]
        restored = 0
        for name in os.listdir(outbox):
            if not name.startswith(_ADOPTING):
                continue
            for host in hosts:  # host ids may hold "-": matched by prefix
                prefix = f"{_ADOPTING}{host}-"
                if name.startswith(prefix):
                    delivery = name[len(prefix) :]
                    break
            else:
                continue
            with contextlib.suppress(FileNotFoundError):
                if os.path.exists(f"{outbox}/{delivery}"):
                    os.unlink(f"{outbox}/{name}")  # written back already
                else:
                    os.rename(f"{outbox}/{name}", f"{outbox}/{delivery}")
                    restored += 1
        return restored
