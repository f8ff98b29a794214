"""Waiting for processes to end, where a zombie has ended.

The processes we stop are often not our children (an agent's supervisor, a Ray head's workers), so
whoever reaps them (init, a container's pid 1) may take seconds to; `psutil.wait_procs` and
`Process.wait` would wait that out for nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import psutil


def exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_exited(pids: Iterable[int], timeout: float, poll: float = 0.01) -> bool:
    """Until every pid has exited (True), or `timeout` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while not exited(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
    return True
