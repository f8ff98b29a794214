"""Issue 13's birthday probing in real kernel NAT: A behind a port-restricted cone, B behind a
random-port symmetric NAT (cone-symmetric). No punch can meet there, so the link starts on the
relay at once; then, in the background, B opens 256 mappings toward A and A probes random ports of
B's address until one meets, and the link moves to that direct path with the transfer intact."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.natlab.agents import LabAgents
from tests.natlab.conftest import LabFactory
from tests.natlab.test_faults_paths import A, PacedPipe, Pair, agents_up
from tests.natlab.test_link_moves import link_paths, wait_for

pytestmark = [pytest.mark.natlab, pytest.mark.ray]


@pytest.fixture
def pair(natlab: LabFactory, tmp_path: Path) -> Iterator[Pair]:
    with agents_up(LabAgents(natlab("cone-symmetric"), tmp_path, "grouped")) as p:  # grouped: ~5 s less to start
        yield p


@pytest.mark.timeout(300)
def test_cone_symmetric_starts_on_the_relay_and_birthday_probing_moves_it_direct(pair: Pair) -> None:
    pipe = PacedPipe(pair, "")
    first = wait_for(pair, pipe, lambda paths: bool(paths), 30)
    assert link_paths(pair)[0][0] == "relay"
    # (no "up" link for a moment while it moves: paths is [] then)
    moved = wait_for(pair, pipe, lambda paths: bool(paths) and paths[-1][0] == "udp_punch", 60)
    time.sleep(1.0)
    rc = pipe.finish()
    a = pair.agents.ops(A, "sessions")
    for row in a["sessions"]:
        print(row.get("role"), row.get("state"), [(x["strategy"], x["outcome"], x["elapsed_ms"], x["reason"][:90])
                                                  for x in row.get("attempts", [])])
    print(f"\ncone-symmetric: link on the relay after {first:.1f}s, on udp_punch {moved:.1f}s later; "
          f"{pipe.figures()}; link paths {link_paths(pair)}")
    assert rc == 0, pipe.stderr.decode()
    assert pipe.intact(), f"sent {pipe.n_sent} got {pipe.n_got}"
    assert a is not None
