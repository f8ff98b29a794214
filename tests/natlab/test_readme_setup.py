"""Issue 10: the README's own two-machine setup, as a newcomer runs it, goes direct.

B (the machine to reach) runs `punchthrough up` with its embedded rendezvous and relay servers;
A runs `punchthrough up --server <B's address> --server-key <what B's up printed>`. B's agent registers with its own
server over 127.0.0.1, yet A must be handed an address it can reach (not B's loopback), so the
session is a direct one and its first byte does not wait for the relay's stagger.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.natlab.agents import OPS, PT, LabAgents, last_session, winner
from tests.natlab.conftest import LabFactory

pytestmark = [pytest.mark.natlab, pytest.mark.ray, pytest.mark.timeout(600)]

RELAY_STAGGER_MS = 1000.0
WEB_PORT = 8000
LOCAL_PORT = 2280
CURLS = 5


@pytest.fixture
def agents(natlab: LabFactory, tmp_path: Path) -> Iterator[LabAgents]:
    lab = natlab("one-public")  # ha on a public address (B, the server host), hb behind a cone NAT (A)
    ag = LabAgents(lab, tmp_path)
    try:
        yield ag
    finally:
        ag.down()


def test_the_readme_setup_goes_direct(agents: LabAgents) -> None:
    """Step by step as the README's "Use" section says, then what a user would measure: curl through -L."""
    lab = agents.lab
    b, a = "ha", "hb"
    target = agents.start_echo(b)
    web = lab.popen(b, [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(WEB_PORT)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert web.poll() is None

    def pt(host: str, *argv: str) -> str:
        out = lab.run(host, [*PT, "--state-dir", str(agents.state(host)), *argv], capture_output=True, timeout=240)
        assert out.returncode == 0, f"{host} {argv}: {out.stderr.decode()[-2000:]}"
        return str(out.stdout.decode())

    b_up = pt(b, "up", "--allow-target", target)
    agents.up_hosts.append(b)
    b_spec = json.loads(pt(b, "id", "--json"))["peer_spec"]
    assert b_spec in b_up, b_up  # `up` says what to tell the peer
    server_key = re.search(r"--server-key (\S+)", b_up)
    assert server_key is not None and "no peer may connect" in b_up, b_up
    a_up = pt(a, "up", "--server", lab.public_addr(b), "--server-key", server_key.group(1))
    agents.up_hosts.append(a)
    assert "registration: registered" in a_up and "trusting" not in a_up, a_up
    a_spec = pt(a, "id").strip()  # what A's owner reads out to B's: ID=SHA256:...
    pt(b, "allow", a_spec)
    pt(b, "allow-target", f"127.0.0.1:{WEB_PORT}")

    payload = os.urandom(1 << 20)
    out = agents.pipe(a, b_spec, target, payload)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == payload
    session = last_session(agents, a)
    won = winner(session)
    won_at = next(x["elapsed_ms"] for x in session["attempts"] if x["outcome"] == "won")
    print(f"\nREADME setup: winner {won} after {won_at:.0f} ms; attempts "
          + ", ".join(f"{x['strategy']}:{x['outcome']}" for x in session["attempts"]))
    assert won in ("tcp_punch", "udp_punch"), session
    assert won_at < RELAY_STAGGER_MS, session

    ping = lab.run(a, [*OPS, "--state-dir", str(agents.state(a)), "ping", b_spec.split("=")[0], "--json"],
                   capture_output=True, timeout=60)
    assert ping.returncode == 0, ping.stderr.decode()
    result = json.loads(ping.stdout)
    assert result["direct"], result
    print(f"ping: via {result['path']}, session in {result['setup_ms']:.0f} ms, round trips {result['rtt_ms']} ms")

    fwd = lab.popen(a, [*PT, "--state-dir", str(agents.state(a)), "connect", b_spec, "-L",
                        f"127.0.0.1:{LOCAL_PORT}:127.0.0.1:{WEB_PORT}"], stderr=subprocess.PIPE)
    assert fwd.stderr is not None and b"forwarding" in fwd.stderr.readline()
    times = []
    for _ in range(CURLS):
        curl = lab.run(a, ["curl", "-sS", "-o", "/dev/null", "-w", "%{time_total}",
                           f"http://127.0.0.1:{LOCAL_PORT}/"], capture_output=True, timeout=60)
        assert curl.returncode == 0, curl.stderr.decode()
        times.append(float(curl.stdout) * 1000)
    print(f"curl through -L, {CURLS} requests, each its own session: "
          + ", ".join(f"{t:.0f}" for t in times) + " ms (was 1050-1150 ms each through the relay)")
