"""Issue 4's proof: real agents (each with its own Ray) behind real kernel NAT pick the best path there
is, move 50 MB intact both ways, and record why the other strategies lost."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ops.cli import render_status
from tests.natlab.agents import LabAgents, last_session, winner
from tests.natlab.conftest import LabFactory

pytestmark = [pytest.mark.natlab, pytest.mark.ray, pytest.mark.timeout(600)]
PLACEMENT = "grouped"
"""CI runs this module's agents grouped (tests/placement.py): the NAT matrix in the small-machine placement."""

MB50 = 50 * 1024 * 1024

# scenario -> (A's host, B's host, A's `--path` policy, acceptable winners)
CASES = {
    "both-cone": ("ha", "hb", "", {"tcp_punch", "udp_punch"}),
    "same-lan": ("ha", "ha2", "", {"lan"}),
    "both-symmetric": ("ha", "hb", "", {"relay"}),
    "cone-symmetric": ("ha", "hb", "", {"relay"}),
    "sequential-cone": ("ha", "hb", "", {"udp_punch"}),  # B punches the ports A's NAT will give next
    "udp-blocked": ("ha", "hb", "", {"tcp_punch"}),
    "one-public": ("ha", "hb", "", {"tcp_punch", "udp_punch"}),
    "ipv6": ("ha", "hb", "", {"ipv6"}),
    "ipv6-v4symmetric": ("ha", "hb", "", {"ipv6"}),
    # TCP would win here too (it retransmits as well); the point is KCP carrying 50 MB through 5 % loss
    "lossy-cone": ("ha", "hb", "disable-tcp-punch", {"udp_punch"}),
    # RustDesk relays as soon as one side is symmetric; the peer-reflexive address gets through
    "fullcone-symmetric": ("ha", "hb", "", {"udp_punch"}),
    "reject": ("ha", "hb", "", {"tcp_punch", "udp_punch"}),
}
CONE: dict[str, object] = {"mapping": "ENDPOINT_INDEPENDENT", "allocation": "PRESERVING", "filtering": "PORT_DEPENDENT"}
BEHAVIOR: dict[str, dict[str, object]] = {
    # what `punchthrough-ops netcheck` must report behind each router ruleset (ops/natlab_scenarios.py)
    "cone": CONE,
    "reject": CONE,
    "lossy": CONE,
    "symmetric": {"mapping": "ENDPOINT_DEPENDENT", "allocation": "RANDOM", "filtering": "PORT_DEPENDENT"},
    "sequential": {"mapping": "ENDPOINT_DEPENDENT", "allocation": "SEQUENTIAL", "filtering": "PORT_DEPENDENT"},
    "fullcone": {"mapping": "ENDPOINT_INDEPENDENT", "allocation": "PRESERVING", "filtering": "OPEN"},
    "public": {"mapping": "ENDPOINT_INDEPENDENT", "allocation": "PRESERVING", "filtering": "OPEN"},
    "udp-blocked": {"udp_blocked": True},
}
OUTCOMES = {"won", "lost the race", "cancelled", "error", "skipped", "failed"}


@pytest.fixture
def agents(natlab: LabFactory, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LabAgents]:
    lab = natlab(request.param)
    ag = LabAgents(lab, tmp_path, PLACEMENT)
    try:
        yield ag
    finally:
        ag.down()


@pytest.mark.parametrize("agents", list(CASES), indirect=True)
def test_best_path_and_intact_data(agents: LabAgents) -> None:
    scenario = agents.lab.scenario.name
    a, b, policy, expected = CASES[scenario]
    agents.start_server()
    target = agents.start_echo(b)
    with ThreadPoolExecutor(2) as pool:  # each is a CLI start: side by side
        a_id, b_id = pool.map(agents.agent_id, (a, b))
    took = agents.up({b: ["--allow", a_id, "--allow-target", target], a: []})
    payload = os.urandom(MB50)
    out = agents.pipe(a, b_id, target, payload, path=policy)
    assert out.returncode == 0, out.stderr.decode()
    assert hashlib.sha256(out.stdout).digest() == hashlib.sha256(payload).digest()
    session = last_session(agents, a)
    won = winner(session)
    print(f"\n{scenario}: agents up in {took:.1f}s; winner {won}; attempts "
          + ", ".join(f"{x['strategy']}:{x['outcome']}({x['reason'][:60]})" for x in session["attempts"]))
    assert won in expected, session
    assert {x["outcome"] for x in session["attempts"]} <= OUTCOMES, session["attempts"]
    with ThreadPoolExecutor(2) as pool:  # each measures for a second or two: both sides at once
        checks = dict(zip((a, b), pool.map(lambda h: agents.ops_cli(h, "netcheck"), (a, b)), strict=True))
    for host in (a, b):  # netcheck measures each NAT as its ruleset built it
        behavior = checks[host]["nat"]["behavior"]
        want = BEHAVIOR[agents.lab.plan.nodes[host].nat or ""]
        assert {k: behavior[k] for k in want} == want, (host, behavior)
    if scenario == "udp-blocked":  # nothing but TCP gets out of either network: both registered over it
        for host in (a, b):
            status = agents.ops(host, "status")
            reg = status["registration"]
            assert (reg["state"], reg["transport"]) == ("registered", "tcp"), reg
            assert "over TCP (UDP blocked at start: no reply to" in render_status(status)  # up told it
