"""Issue 12 in real kernel NAT (both-cone): one transfer over one link while the direct path between
the two NATs is blocked, lifted, and blocked again. The link comes up on the relay, moves to a
direct path once one authenticates (the relay kept until the move is done), falls back to the relay
when the direct path dies under it, and the transfer arrives intact through all of it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.natlab.agents import LabAgents
from tests.natlab.conftest import LabFactory
from tests.natlab.test_faults_paths import A, B, PacedPipe, Pair, agents_up

pytestmark = [pytest.mark.natlab, pytest.mark.ray]


@pytest.fixture
def pair(natlab: LabFactory, tmp_path: Path) -> Iterator[Pair]:
    with agents_up(LabAgents(natlab("both-cone"), tmp_path, "grouped")) as p:  # grouped: ~5 s less to start
        yield p


def block_direct(pair: Pair, on: bool) -> None:
    """Drop everything between A and B's public (NAT) address in A's namespace; the rendezvous server
    and the relay (on wan) stay reachable."""
    lab = pair.agents.lab
    peer = lab.public_addr(B)
    op = "-I" if on else "-D"
    for chain, flag in (("OUTPUT", "-d"), ("INPUT", "-s")):
        out = lab.run(A, ["iptables", op, chain, flag, peer, "-j", "DROP"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def link_paths(pair: Pair) -> list[tuple[str, str]]:
    """The paths of A's link to B so far ([] until it is up)."""
    links: list[dict[str, Any]] = [x for x in pair.agents.ops(A, "links")["links"] if x["state"] == "up"]
    assert len(links) <= 1, links  # one transfer, one link
    return [(h["path"], h["why"]) for h in links[0]["history"]] if links else []


def wait_for(pair: Pair, pipe: PacedPipe, cond: Any, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        assert pipe.running(), pipe.stderr.decode()
        if cond(link_paths(pair)):
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f}s: link paths {link_paths(pair)}")


@pytest.mark.timeout(300)
def test_a_transfer_moves_relay_to_direct_and_back_intact(pair: Pair) -> None:
    block_direct(pair, True)
    pipe = PacedPipe(pair, "")
    wait_for(pair, pipe, lambda paths: paths and paths[0][0] == "relay", 30)

    block_direct(pair, False)  # a direct path is possible from now on: the link should find it
    up_after = wait_for(pair, pipe, lambda paths: paths[-1][0] != "relay", 90)
    direct = link_paths(pair)[-1][0]

    block_direct(pair, True)  # and now it dies under the transfer
    down_after = wait_for(pair, pipe, lambda paths: len(paths) >= 3 and paths[-1][0] == "relay", 90)
    time.sleep(1.0)
    rc = pipe.finish()
    paths = link_paths(pair)
    print(
        f"\nboth-cone: one transfer {pipe.figures()}; moved to {direct} {up_after:.1f}s after the block was "
        f"lifted, back to the relay {down_after:.1f}s after the direct path was cut; link paths {paths}"
    )
    assert rc == 0, pipe.stderr.decode()
    assert pipe.intact(), f"sent {pipe.n_sent} got {pipe.n_got}"
    assert direct in ("tcp_punch", "udp_punch")
