"""Network change on one host (issue 5): B moves from behind a symmetric NAT to a public address while
its agent runs. The agent must notice, re-bind and re-register at once, re-measure its NAT, and the
next session must take the path the new network allows (a direct punch, where before only the relay
could work). Without the re-measurement B would keep claiming SYMMETRIC and the server would keep
sending both sides to the relay."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.cli import render_status
from tests.natlab.agents import LabAgents, last_session, winner
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
    assert "198.51.100.22" in reg["network"]["last_change"]
    assert reg["network"]["rebinds"] >= 1 and reg["local"] != old_local
    assert seen["nat"]["error"] == "" and seen["nat"]["port1"] == seen["nat"]["port2"]
    assert "network" in render_status(seen)

    out = agents.pipe("ha", b_id, target, payload)
    assert out.returncode == 0, out.stderr.decode()
    assert hashlib.sha256(out.stdout).digest() == hashlib.sha256(payload).digest()
    session = last_session(agents, "ha")
    won = winner(session)
    print(f"roaming: after the move the session went {won} ({time.monotonic() - moved_at:.1f} s after it); "
          + ", ".join(f"{x['strategy']}:{x['outcome']}" for x in session["attempts"]))
    assert won in {"tcp_punch", "udp_punch"}, session



@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_session_on_the_old_network_ends_with_a_reason_not_a_hang(agents: LabAgents) -> None:
    """An idle relayed session open while B moves: B's leg of the relay pair is dead (its address is
    gone). Keepalives (every 10 s of silence) meet the 30 s dead-path timeout on the relay's legs, so
    A's client sees an error within about 40 s instead of hanging for TCP's ~15 minutes. Slow: it
    waits out those real timeouts."""
    agents.start_server()
    target = agents.start_echo("hb")
    a_id, b_id = agents.agent_id("ha"), agents.agent_id("hb")
    agents.up({"hb": ["--allow", a_id, "--allow-target", target], "ha": []})
    proc = agents.pipe_popen("ha", b_id, target)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(b"ping\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == b"ping\n"
    assert winner(last_session(agents, "ha")) == "relay"
    moved = time.monotonic()
    agents.lab.roam("hb")
    rc = proc.wait(timeout=120)
    took = time.monotonic() - moved
    err = proc.stderr.read().decode().strip()
    print(f"\nold session ended {took:.1f} s after the move: exit {rc}: {err}")
    assert rc != 0 and err.count("\n") == 0 and "failed" in err
