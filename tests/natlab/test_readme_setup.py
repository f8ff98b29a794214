"""Issue 10: the README's own two-machine setup, as a newcomer runs it, goes direct.

B (the machine to reach) runs `punchthrough up` with its embedded rendezvous and relay servers;
A runs `punchthrough up --server <B's address>` and no other flag. B's agent registers with its own
server over 127.0.0.1, yet A must be handed an address it can reach (not B's loopback), so the
session is a direct one and its first byte does not wait for the relay's stagger.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.natlab.agents import PT, LabAgents, last_session, winner
from tests.natlab.conftest import LabFactory

pytestmark = [pytest.mark.natlab, pytest.mark.ray, pytest.mark.timeout(600)]

RELAY_STAGGER_MS = 1000.0


@pytest.fixture
def agents(natlab: LabFactory, tmp_path: Path) -> Iterator[LabAgents]:
    lab = natlab("one-public")  # ha on a public address (B, the server host), hb behind a cone NAT (A)
    ag = LabAgents(lab, tmp_path)
    try:
        yield ag
    finally:
        ag.down()


def test_the_readme_setup_goes_direct(agents: LabAgents) -> None:
    lab = agents.lab
    b, a = "ha", "hb"
    target = agents.start_echo(b)

    def pt(host: str, *argv: str) -> str:
        out = lab.run(host, [*PT, "--state-dir", str(agents.state(host)), *argv], capture_output=True, timeout=240)
        assert out.returncode == 0, f"{host} {argv}: {out.stderr.decode()[-2000:]}"
        return str(out.stdout.decode())

    a_spec = pt(a, "id").strip()  # what A's owner reads out to B's: ID=SHA256:...
    b_up = pt(b, "up", "--allow", a_spec, "--allow-target", target)
    agents.up_hosts.append(b)
    b_info = json.loads(pt(b, "id", "--json"))
    assert b_info["peer_spec"] in b_up, b_up  # `up` says what to tell the peer
    a_up = pt(a, "up", "--server", lab.public_addr(b))
    agents.up_hosts.append(a)
    assert "trusting rendezvous server" in a_up, a_up  # first contact, said once

    payload = os.urandom(1 << 20)
    out = agents.pipe(a, b_info["peer_spec"], target, payload)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == payload
    session = last_session(agents, a)
    won = winner(session)
    won_at = next(x["elapsed_ms"] for x in session["attempts"] if x["outcome"] == "won")
    print(f"\nREADME setup: winner {won} after {won_at:.0f} ms; attempts "
          + ", ".join(f"{x['strategy']}:{x['outcome']}" for x in session["attempts"]))
    assert won in ("tcp_punch", "udp_punch"), session
    assert won_at < RELAY_STAGGER_MS, session
