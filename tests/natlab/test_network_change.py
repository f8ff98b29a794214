"""Network change on one host (issue 5): B moves from behind a symmetric NAT to a public address while
its agent runs. The agent must notice, re-bind and re-register at once, re-measure its NAT, and the
next session must take the path the new network allows (a direct punch, where before only the relay
could work). Without the re-measurement B would keep claiming SYMMETRIC and the server would keep
sending both sides to the relay."""

from __future__ import annotations

import hashlib
import os
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from ops.cli import render_status
from tests.natlab.agents import LabAgents, last_session, winner
from tests.natlab.clients import ssh_argv, start_sshd
from tests.natlab.conftest import LabFactory

pytestmark = [pytest.mark.natlab]

SERVER = ("198.51.100.1", 21116)


def test_roam_moves_the_host_to_a_public_address(natlab: LabFactory) -> None:
    lab = natlab("roaming")
    wan = lab.socket("wan")
    wan.bind(("198.51.100.1", 5000))
    wan.settimeout(2)
    hb = lab.socket("hb")
    hb.bind(("0.0.0.0", 0))
    hb.sendto(b"before", ("198.51.100.1", 5000))
    data, seen = wan.recvfrom(100)
    assert data == b"before" and seen[0] == "198.51.100.12"  # behind rb's symmetric NAT
    assert lab.roam("hb") == "198.51.100.22"
    hb.sendto(b"after", ("198.51.100.1", 5000))
    data, seen = wan.recvfrom(100)
    assert data == b"after" and seen == ("198.51.100.22", hb.getsockname()[1])  # public now, port kept
    wan.sendto(b"unsolicited", ("198.51.100.22", hb.getsockname()[1]))
    hb.settimeout(2)
    assert hb.recv(100) == b"unsolicited"  # nothing filters a public host
    with pytest.raises(Exception, match="cannot roam"):
        lab.roam("ha")


@pytest.fixture
def agents(natlab: LabFactory, tmp_path: Path) -> Iterator[LabAgents]:
    ag = LabAgents(natlab("roaming"), tmp_path)
    try:
        yield ag
    finally:
        ag.down()


def _wait(cond: Any, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if cond():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


class Lines:
    """A process's stdout, line by line as they come, each with the time it arrived."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.queue: queue.Queue[tuple[float, bytes]] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout
        threading.Thread(target=self._read, args=(stdout,), daemon=True).start()

    def _read(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            self.queue.put((time.monotonic(), line))

    def next(self, timeout: float) -> tuple[float, bytes]:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return time.monotonic(), b""


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_a_move_keeps_the_ssh_session_and_new_sessions_take_the_new_best_path(
    agents: LabAgents, tmp_path: Path
) -> None:
    """Both sides symmetric, so on the relay: an interactive OpenSSH session over `pipe` (issue 12's roaming
    scenario) and an echo transfer, then B moves to a public address. B's agent must notice, re-bind,
    re-register and re-measure its NAT at once; B's leg of the relay dies with its old address, so the link
    races for a new transport (a direct one is possible now) and resumes there: the ssh session carries on,
    no line lost, none twice; the next transfer takes the direct path. One lab and one agent pair serve
    both stories (a pair's start is most of each one's time)."""
    agents.start_server()
    target = agents.start_echo("hb")
    key = start_sshd(agents.lab, "hb", tmp_path / "sshd")
    a_id, b_id = agents.agent_id("ha"), agents.agent_id("hb")
    agents.up({"hb": ["--allow", a_id, "--allow-target", target, "--allow-target", "127.0.0.1:2222"], "ha": []})

    def nat_of(host: str) -> str:
        return str((agents.ops(host, "status")["nat"] or {}).get("nat_name"))

    _wait(lambda: nat_of("hb") == "SYMMETRIC" and nat_of("ha") == "SYMMETRIC", 60)
    argv = ssh_argv(agents, "ha", key, b_id, "127.0.0.1:2222", "while read l; do echo got $l; done")
    proc = agents.lab.popen("ha", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    lines = Lines(proc)
    proc.stdin.write(b"one\n")
    proc.stdin.flush()
    assert lines.next(60)[1] == b"got one\n"
    (link,) = [x for x in agents.ops("ha", "links")["links"] if x["state"] == "up"]
    assert link["path"] == "relay", link
    payload = os.urandom(2 * 1024 * 1024)
    out = agents.pipe("ha", b_id, target, payload)
    assert out.returncode == 0, out.stderr.decode()
    assert hashlib.sha256(out.stdout).digest() == hashlib.sha256(payload).digest()
    session = last_session(agents, "ha")
    assert (winner(session) or session.get("path")) == "relay", session
    old_local = agents.ops("hb", "status")["registration"]["local"]

    agents.lab.roam("hb")
    moved = time.monotonic()
    proc.stdin.write(b"two\n")
    proc.stdin.flush()
    seen: dict[str, Any] = {}

    def noticed() -> bool:
        st = agents.ops("hb", "status")
        seen.update(st)
        reg = st["registration"]
        net = reg.get("network") or {}
        return bool(net.get("local_changes")) and reg.get("state") == "registered" and \
            (st["nat"] or {}).get("nat_name") == "ASYMMETRIC"

    took = _wait(noticed, 30)
    reg = seen["registration"]
    print(f"\nroaming: B noticed, re-registered and re-measured within {took:.2f} s of the move; "
          f"change: {reg['network']['last_change']}; socket {old_local} -> {reg['local']}")
    assert reg["network"]["view"]["route"] == "198.51.100.22"
    assert "198.51.100.22" in reg["network"]["last_local_change"]  # the server's hint may come after it
    assert reg["network"]["rebinds"] >= 1 and reg["local"] != old_local
    assert seen["nat"]["error"] == "" and seen["nat"]["port1"] == seen["nat"]["port2"]
    assert "network" in render_status(seen)

    answered, line = lines.next(120)
    assert line == b"got two\n"
    proc.stdin.write(b"three\n")
    proc.stdin.flush()
    assert lines.next(30)[1] == b"got three\n"

    def direct_link() -> bool:  # the link to B moves off the relay once a direct path authenticates
        return any(x["path"] != "relay" for x in agents.ops("ha", "links")["links"] if x["id"] == link["id"])

    _wait(direct_link, 60)
    out = agents.pipe("ha", b_id, target, payload)
    assert out.returncode == 0, out.stderr.decode()
    assert hashlib.sha256(out.stdout).digest() == hashlib.sha256(payload).digest()
    session = last_session(agents, "ha")
    won = winner(session) or str(session.get("path"))  # a stream on the link that moved there already
    print(f"roaming: after the move the next transfer went {won} ({time.monotonic() - moved:.1f} s after it)")
    assert won in {"tcp_punch", "udp_punch"}, session
    proc.stdin.close()
    assert proc.wait(30) == 0, proc.stderr.read().decode()
    (link,) = [x for x in agents.ops("ha", "links")["links"] if x["id"] == link["id"]]
    paths = [(h["path"], h["why"]) for h in link["history"]]
    print(f"roaming: the ssh session answered again {answered - moved:.1f} s after B moved; link paths: {paths}")
    assert link["state"] == "up" and len(paths) >= 2 and paths[-1][0] != "relay", paths
