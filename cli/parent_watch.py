"""A child of ``labctl worker --concurrency N`` dies with its supervisor.

Without this, a SIGKILL of the supervisor (the OOM killer, ``kill -9``) re-parents its
children to PID 1, where they keep training and keep taking jobs with nobody to stop them.
A child that dies instead leaves its job to the lease, like any dead worker: the reapers of
the workers still alive requeue it and it resumes from its last checkpoint.

Linux: ``PR_SET_PDEATHSIG`` makes the kernel send SIGKILL when the parent exits. The
setting is made in the child, after ``exec``, so the parent may already be gone by then:
comparing ``os.getppid()`` with the pid the supervisor passed closes that race. Elsewhere
a daemon thread polls ``os.getppid()``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading

#: The supervisor's pid, set in each child's environment by the supervisor.
SUPERVISOR_PID_ENV = "LABCTL_SUPERVISOR_PID"
#: linux/prctl.h
PR_SET_PDEATHSIG = 1
#: How often the fallback thread looks at its parent.
POLL_SECONDS = 1.0


def die_with_supervisor() -> None:
    """If this process was started by a supervisor, make sure it does not outlive it."""
    expected = os.environ.pop(SUPERVISOR_PID_ENV, None)
    if not expected:
        return
    supervisor = int(expected)
    if not _set_parent_death_signal(signal.SIGKILL):
        threading.Thread(target=_watch_parent, args=(supervisor,), name="labctl-parent-watch",
                         daemon=True).start()
    # The signal is only armed from here on: a supervisor that died before this line was
    # missed, and this process now has another parent.
    if os.getppid() != supervisor:
        _die()


def _set_parent_death_signal(signum: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(supervisor: int) -> None:
    while os.getppid() == supervisor:
        threading.Event().wait(POLL_SECONDS)
    _die()


def _die() -> None:
    # As abrupt as the supervisor's own death: no hand-back, the lease recovers the job.
    os.kill(os.getpid(), signal.SIGKILL)
