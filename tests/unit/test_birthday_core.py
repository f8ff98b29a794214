"""Birthday probing's decisions: who sprays, who probes, how much, how often (agent/strategies/birthday_core.py)."""

from __future__ import annotations

import random

import pytest

from agent.proto import rendezvous_pb2 as pb
from agent.strategies.birthday_core import FIRST_PORT, PORT_SPACE, Budget, Limiter, birthday_role, probe_ports
from agent.wire.nat_behavior import NatBehavior

NB = pb.NatBehavior
CONE = NatBehavior(NB.ENDPOINT_INDEPENDENT, NB.PRESERVING, 0, NB.PORT_DEPENDENT)
FULL_CONE = NatBehavior(NB.ENDPOINT_INDEPENDENT, NB.PRESERVING, 0, NB.OPEN)
SYM_RANDOM = NatBehavior(NB.ENDPOINT_DEPENDENT, NB.RANDOM, 0, NB.PORT_DEPENDENT)
SYM_SEQ = NatBehavior(NB.ENDPOINT_DEPENDENT, NB.SEQUENTIAL, 1, NB.PORT_DEPENDENT)


@pytest.mark.parametrize(
    ("ours", "theirs", "want"),
    [
        (SYM_RANDOM, CONE, "spray"),
        (CONE, SYM_RANDOM, "probe"),
        (SYM_RANDOM, SYM_RANDOM, None),  # both symmetric: nobody can probe for the other
        (CONE, CONE, None),  # a plain punch meets
        (FULL_CONE, SYM_RANDOM, None),  # the peer-reflexive punch meets
        (CONE, SYM_SEQ, None),  # prediction meets
        (CONE, NatBehavior(udp_blocked=True), None),
        (NatBehavior(), SYM_RANDOM, None),  # not measured: no spraying on a guess
    ],
)
def test_roles(ours: NatBehavior, theirs: NatBehavior, want: str | None) -> None:
    assert birthday_role(ours, theirs) == want


def test_the_default_budget_and_its_odds() -> None:
    b = Budget()
    assert (b.sockets, b.probes, b.rate, b.seconds) == (256, 2000, 1000.0, 2.0)
    assert b.chance == pytest.approx(1 - (1 - 256 / 64512) ** 2000)
    assert b.chance > 0.999
    assert b.packets() == 2000 + 256 * 3
    assert b.describe() == "256 sockets x 2000 probes at 1000/s: 2 s, at most 2768 datagrams, 99.96% to meet"
    assert Budget(sockets=64, probes=500).chance == pytest.approx(0.3912, abs=1e-3)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"sockets": 0}, "birthday_sockets must be within 1-1024, got 0"),
        ({"sockets": 5000}, "birthday_sockets"),
        ({"probes": 0}, "birthday_probes must be within 1-64512"),
        ({"rate": 0.5}, "birthday_rate"),
        ({"rate": float("nan")}, "birthday_rate"),
        ({"refresh": 0.0}, "refresh"),
    ],
)
def test_a_bad_budget_is_refused_naming_its_key(kw: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Budget(**kw)  # type: ignore[arg-type]


def test_probe_ports_are_distinct_and_in_the_nat_range() -> None:
    ports = probe_ports(2000, random.Random(7))
    assert len(ports) == len(set(ports)) == 2000
    assert all(FIRST_PORT <= p <= 65535 for p in ports)
    assert sorted(probe_ports(PORT_SPACE + 5, random.Random(1))) == list(range(FIRST_PORT, 65536))


def test_the_limiter_paces_each_peer_and_runs_one_at_a_time() -> None:
    lim = Limiter(per_peer_interval=30.0, max_running=1)
    assert lim.start("peer-a", 100.0) == ""
    assert lim.start("peer-b", 100.5) == "another birthday probe is running"
    lim.done()
    assert "ran 5 s ago (at most once per 30 s)" in lim.start("peer-a", 105.0)
    assert lim.start("peer-b", 105.0) == ""
    lim.done()
    assert lim.start("peer-a", 130.0) == ""
    assert lim.refused == 2


def test_the_limiter_forgets_the_oldest_peers_first() -> None:
    lim = Limiter(per_peer_interval=30.0, max_running=10_000, max_peers=3)
    for i in range(5):
        assert lim.start(f"p{i}", 0.0) == ""
    assert lim.start("p0", 1.0) == ""  # forgotten: the table stays bounded
    assert lim.start("p4", 1.0) != ""
