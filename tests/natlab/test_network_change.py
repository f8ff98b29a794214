"""Network change on one host (issue 5): B moves from behind a symmetric NAT to a public address while
its agent runs. The agent must notice, re-bind and re-register at once, re-measure its NAT, and the
next session must take the path the new network allows (a direct punch, where before only the relay
could work). Without the re-measurement B would keep claiming SYMMETRIC and the server would keep
sending both sides to the relay."""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_agent_notices_a_move_and_new_sessions_take_the_new_best_path(agents: LabAgents) -> None:
    agents.start_server()
    target = agents.start_echo("hb")
    a_id, b_id = agents.agent_id("ha"), agents.agent_id("hb")
    agents.up({"hb": ["--allow", a_id, "--allow-target", target], "ha": []})

    def nat_of(host: str) -> str:
        return str((agents.ops(host, "status")["nat"] or {}).get("nat_name"))

    _wait(lambda: nat_of("hb") == "SYMMETRIC" and nat_of("ha") == "SYMMETRIC", 60)
    payload = os.urandom(2 * 1024 * 1024)
    out = agents.pipe("ha", b_id, target, payload)
    assert out.returncode == 0, out.stderr.decode()
    assert hashlib.sha256(out.stdout).digest() == hashlib.sha256(payload).digest()
    assert winner(last_session(agents, "ha")) == "relay"
    before = agents.ops("hb", "status")["registration"]
    old_local = before["local"]

    moved_at = time.monotonic()
    agents.lab.roam("hb")
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

    def direct_link() -> bool:  # the link to B: it moves off the relay once a direct path authenticates
        links = [x for x in agents.ops("ha", "links")["links"] if x["state"] == "up"]
        return any(x["path"] != "relay" for x in links) or not links

    _wait(direct_link, 60)
    out = agents.pipe("ha", b_id, target, payload)
    assert out.returncode == 0, out.stderr.decode()
    assert hashlib.sha256(out.stdout).digest() == hashlib.sha256(payload).digest()
    session = last_session(agents, "ha")
    won = winner(session) or str(session.get("path"))  # or a stream on the link that moved there already
    print(f"roaming: after the move the session went {won} ({time.monotonic() - moved_at:.1f} s after it); "
          + ", ".join(f"{x['strategy']}:{x['outcome']}" for x in session["attempts"]))
    assert won in {"tcp_punch", "udp_punch"}, session



def _line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else b""


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_an_ssh_session_over_pipe_survives_the_move(agents: LabAgents, tmp_path: Path) -> None:
    """Issue 12's roaming scenario: an interactive OpenSSH session over `pipe` (both sides symmetric, so
    on the relay) while B moves to a public address. B's leg of the relay dies with its old address;
    the link notices, races for a new transport (a direct one is possible now) and resumes there, and
    the ssh session carries on as if nothing happened: no line lost, none twice."""
    agents.start_server()
    key = start_sshd(agents.lab, "hb", tmp_path / "sshd")
    a_id, b_id = agents.agent_id("ha"), agents.agent_id("hb")
    agents.up({"hb": ["--allow", a_id, "--allow-target", "127.0.0.1:2222"], "ha": []})

    def nat_of(host: str) -> str:
        return str((agents.ops(host, "status")["nat"] or {}).get("nat_name"))

    _wait(lambda: nat_of("hb") == "SYMMETRIC" and nat_of("ha") == "SYMMETRIC", 60)
    argv = ssh_argv(agents, "ha", key, b_id, "127.0.0.1:2222", "while read l; do echo got $l; done")
    proc = agents.lab.popen("ha", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(b"one\n")
    proc.stdin.flush()
    assert _line(proc, 60) == b"got one\n"
    (link,) = [x for x in agents.ops("ha", "links")["links"] if x["state"] == "up"]
    assert link["path"] == "relay", link

    agents.lab.roam("hb")
    moved = time.monotonic()
    proc.stdin.write(b"two\n")
    proc.stdin.flush()
    assert _line(proc, 120) == b"got two\n"
    took = time.monotonic() - moved
    proc.stdin.write(b"three\n")
    proc.stdin.flush()
    assert _line(proc, 30) == b"got three\n"
    proc.stdin.close()
    assert proc.wait(30) == 0, proc.stderr.read().decode()
    (link,) = [x for x in agents.ops("ha", "links")["links"] if x["id"] == link["id"]]
    paths = [(h["path"], h["why"]) for h in link["history"]]
    print(f"\nroaming: the ssh session answered again {took:.1f} s after B moved; link paths: {paths}")
    assert link["state"] == "up" and len(paths) >= 2 and paths[-1][0] != "relay", paths
