"""Worker names: distinct by default, and a name already in use refused at start.

Two workers under one name would be one worker to everything that reads names: the
``worker`` field of a job, "running on worker X; cancel it first", ``/metrics``, the
presence that ``submit --follow`` checks. Celery only warns about duplicate node names
(through mingle, which labctl turns off), so the default, ``labctl-%p@%h``, carries the
process id: two workers started on one host differ without any coordination. A name given
with ``--hostname`` is the user's promise of uniqueness, and it is checked: the worker
reserves its name in Redis (``labctl:worker:<name>``, the key it then renews) and refuses
to start while another live worker holds it. A holder on this host whose process is gone
(a SIGKILLed worker whose entry has not expired yet) does not count.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from labctl.cli.errors import JobBusy
from labctl.shared.records import JobRecords

DEFAULT_NAME = "labctl-%p@%h"
#: How long a reservation lasts before the worker's reaper first renews it (start-up can
#: take seconds: Celery, torch); after that the reaper's own ttl applies.
RESERVATION_SECONDS = 60.0


class NameTaken(JobBusy):
    """Another live worker already has this name."""


def expand(name: str) -> str:
    """``%p``: this process' id (Celery knows no such key); ``%h`` and friends as Celery
    expands them."""
    from celery.utils.nodenames import host_format

    return host_format(name.replace("%p", str(os.getpid())))


def reserve(records: JobRecords, name: str, queues: list[str]) -> None:
    """Take ``name`` for this process or raise :class:`NameTaken` (exit 4)."""
    holder = records.reserve_worker_name(name, queues, RESERVATION_SECONDS)
    if holder is not None and not holder_alive(holder):
        holder = records.reserve_worker_name(name, queues, RESERVATION_SECONDS,
                                             replacing=holder)
    if holder is not None:
        where = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
        raise NameTaken(f"worker name {name} is taken by a running worker ({where}); give "
                        "this one another: --hostname NAME@%h (or leave it out: the default "
                        f"{DEFAULT_NAME} is unique on a host)")


def holder_alive(holder: dict) -> bool:
    """Whether the process that announced ``holder`` may still run. Only a process on this
    host can be looked at; one elsewhere is alive until its entry expires."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    pid = holder["pid"]
    if pid == os.getpid():  # this very process: the entry is a previous life's (a container)
        return False
    return pid_alive(pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:  # a zombie (nobody reaped it yet) runs nothing
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")
