"""One writer per job folder: an exclusive lock every run holds while it writes.

A run (``labctl run`` or a worker's attempt) takes ``<folder>/run.lock`` with ``flock``
before it writes anything and keeps it until it returns. The kernel drops the lock when the
process dies, however it dies (SIGKILL included), so a lock is never stale and nothing has
to clean it up; a second writer on the same host is refused at once. The file keeps a line
naming its last holder, for the message that refuses the second writer and for telling a
killed local run ("abandoned") from a live one.

``flock`` is per host: on a volume shared by several hosts (NFS) it may not exclude a writer
on another host. Workers are kept apart across hosts by their Redis lease; this lock is what
keeps a local run out of a folder a worker (or another local run) on this host is writing.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = "run.lock"
#: How a ``labctl run`` process names itself as a holder (a worker says "worker <name>").
LOCAL_RUN = "a local run"


class FolderBusy(RuntimeError):
    """Another process holds the folder; ``holder`` says who (as it described itself)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is being written by {holder}")
        self.path, self.holder = path, holder


def describe(who: str) -> str:
    """How a holder names itself: ``who`` (e.g. "worker labctl@host" or "a local run"),
    with its process and host, so a reader on another host can tell it is not theirs."""
    return f"{who} (pid {os.getpid()} on {socket.gethostname()})"


@contextmanager
def hold(folder: Path, who: str) -> Iterator[None]:
    """Hold ``folder``'s lock for the block, or raise :class:`FolderBusy` at once.
    ``folder`` must exist."""
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock_or_raise(fd, folder)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (describe(who) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def holder(folder: Path) -> str | None:
    """Who holds ``folder`` now, or None if no process on this host does."""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or "another process"
        return None
    finally:
        os.close(fd)


def last_holder_host(folder: Path) -> str | None:
    """The host named by the folder's last holder (alive or not), if any ever held it."""
    try:
        line = (folder / LOCK_NAME).read_text().strip()
    except OSError:
        return None
    head, sep, host = line.rpartition(" on ")
    return host.rstrip(")") if sep and head else None


def _lock_or_raise(fd: int, folder: Path) -> None:
    # A few tries: a reader's probe (holder(), e.g. `labctl status`) holds the lock for an
    # instant, and must not make a run that starts at that moment refuse to.
    for attempt in range(5):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt < 4:
                time.sleep(0.05)
    raise FolderBusy(folder, _read_holder(fd) or "another process")


def _read_holder(fd: int) -> str:
    return os.pread(fd, 1024, 0).decode(errors="replace").strip()
