"""agent.kcp.release frees what the kcp binding leaks, and refuses anything it cannot vouch for."""

from __future__ import annotations

import subprocess
import sys

from kcp.extension import KCP

from agent.kcp import release as kcp_release


def test_release_frees_once_and_only_with_the_right_conv() -> None:
    before = kcp_release.released
    k = KCP(7)
    assert not kcp_release.release(k, 8)  # not the block we made: left alone
    assert kcp_release.release(k, 7)
    assert not kcp_release.release(k, 7)  # pointer cleared: a second free is impossible
    assert kcp_release.released == before + 1
    assert not kcp_release.release(object(), 7)
    big = KCP(-2)  # convs >= 2**31 are passed to the binding as negative C ints
    assert kcp_release.release(big, (1 << 32) - 2)


LEAK = """
import sys
import psutil
from kcp.extension import KCP
from agent.kcp import release as kcp_release
free = sys.argv[1] == "free"
for _ in range(20000):
    k = KCP(5)
    k.include_outbound_handler(lambda *a: None)
    k.enqueue(b"x" * 5000)  # a session that ended with data still queued
    if free:
        kcp_release.release(k, 5)
print(psutil.Process().memory_info().rss // (1 << 20))  # now, not the peak: ru_maxrss survives exec
"""


def test_released_sessions_do_not_leak_their_queues() -> None:
    rss = {mode: int(subprocess.run([sys.executable, "-c", LEAK, mode], capture_output=True, check=True,
                                     text=True).stdout) for mode in ("free", "leak")}
    # 20,000 x 5 KB queued is ~100 MB when leaked; freed, RSS stays at the interpreter's size
    assert rss["leak"] - rss["free"] > 60, rss
