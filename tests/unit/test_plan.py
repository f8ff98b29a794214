"""The connection plan: the seed's decision tree, raced, for every combination of inputs."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.control.plan import RELAY_STAGGER, RELAY_STAGGER_LONG_SHOT, Mode, Policy, Situation, Strategy, make_plan
from agent.proto import rendezvous_pb2 as pb
from agent.wire.nat_behavior import NatBehavior

NB = pb.NatBehavior
CONE = NatBehavior(NB.ENDPOINT_INDEPENDENT, NB.PRESERVING, 0, NB.PORT_DEPENDENT)
FULL_CONE = NatBehavior(NB.ENDPOINT_INDEPENDENT, NB.PRESERVING, 0, NB.OPEN)
SYM_RANDOM = NatBehavior(NB.ENDPOINT_DEPENDENT, NB.RANDOM, 0, NB.PORT_DEPENDENT)
SYM_SEQ = NatBehavior(NB.ENDPOINT_DEPENDENT, NB.SEQUENTIAL, 1, NB.PORT_DEPENDENT)

NATS = (pb.UNKNOWN_NAT, pb.ASYMMETRIC, pb.SYMMETRIC)


def test_both_cone_races_punches_then_relay() -> None:
    plan = make_plan(Situation(pb.ASYMMETRIC, pb.ASYMMETRIC, our_udp=True, peer_udp=True))
    assert plan.strategies() == [Strategy.TCP_PUNCH, Strategy.UDP_PUNCH, Strategy.RELAY]
    relay = plan.steps[-1]
    assert relay.delay == RELAY_STAGGER
    assert all(s.delay == 0 for s in plan.steps[:-1])


def test_same_lan_goes_lan_first() -> None:
    plan = make_plan(Situation(pb.ASYMMETRIC, pb.ASYMMETRIC, same_lan=True, our_udp=True, peer_udp=True))
    assert plan.strategies() == [Strategy.LAN, Strategy.RELAY]


def test_both_symmetric_goes_straight_to_relay() -> None:
    plan = make_plan(Situation(pb.SYMMETRIC, pb.SYMMETRIC, our_udp=True, peer_udp=True))
    assert plan.strategies() == [Strategy.RELAY]
    assert plan.steps[0].delay == 0
    assert dict(plan.skipped)[Strategy.UDP_PUNCH].startswith("both sides")


def test_one_symmetric_still_tries_direct() -> None:
    """RustDesk relays when either side is symmetric; a full cone on the other side can still be punched."""
    plan = make_plan(Situation(pb.SYMMETRIC, pb.ASYMMETRIC, our_udp=True, peer_udp=True))
    assert Strategy.UDP_PUNCH in plan.strategies() and Strategy.TCP_PUNCH in plan.strategies()
    # ... but they are a long shot (a full cone), so the relay joins sooner
    assert plan.steps[-1].strategy is Strategy.RELAY and plan.steps[-1].delay == RELAY_STAGGER_LONG_SHOT
    v6 = make_plan(Situation(pb.ASYMMETRIC, pb.SYMMETRIC, v6_both=True, our_udp=True, peer_udp=True))
    assert v6.steps[-1].delay == RELAY_STAGGER  # IPv6 is no long shot


def test_ipv6_when_both_have_it() -> None:
    plan = make_plan(Situation(pb.SYMMETRIC, pb.SYMMETRIC, v6_both=True))
    assert plan.strategies() == [Strategy.IPV6, Strategy.RELAY]


def test_policies() -> None:
    sit = Situation(pb.ASYMMETRIC, pb.ASYMMETRIC, v6_both=True, our_udp=True, peer_udp=True)
    assert make_plan(sit, Policy.parse("relay-only")).strategies() == [Strategy.RELAY]
    assert Strategy.RELAY not in make_plan(sit, Policy.parse("direct-only")).strategies()
    assert Strategy.UDP_PUNCH not in make_plan(sit, Policy.parse("disable-udp")).strategies()
    assert Strategy.TCP_PUNCH not in make_plan(sit, Policy.parse("disable-tcp-punch")).strategies()
    assert Strategy.IPV6 not in make_plan(sit, Policy.parse(["disable-ipv6"])).strategies()
    assert Policy.parse("relay").mode is Mode.RELAY_ONLY and Policy.parse("direct").mode is Mode.DIRECT_ONLY


def test_direct_address_skips_everything_else() -> None:
    assert make_plan(Situation(direct_address=True)).strategies() == [Strategy.DIRECT]
    assert make_plan(Situation(direct_address=True), Policy.parse("relay-only")).strategies() == []


@pytest.mark.parametrize("bad", ["fast", "relay-only,bogus", "DISABLE-UDP"])
def test_bad_policy_words(bad: str) -> None:
    with pytest.raises(ValueError, match="unknown path policy"):
        Policy.parse(bad)


@given(
    st.sampled_from(NATS),
    st.sampled_from(NATS),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.sampled_from(list(Mode)),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_plan_invariants(ours, peers, lan, oudp, pudp, v6, mode, udp, tcp, ipv6) -> None:
    sit = Situation(ours, peers, lan, oudp, pudp, v6)
    plan = make_plan(sit, Policy(mode, udp, tcp, ipv6))
    names = plan.strategies()
    assert len(names) == len(set(names))
    tried_or_skipped = set(names) | {s for s, _ in plan.skipped}
    assert tried_or_skipped >= {Strategy.LAN, Strategy.IPV6, Strategy.TCP_PUNCH, Strategy.UDP_PUNCH}
    assert (Strategy.RELAY in names) == (mode is not Mode.DIRECT_ONLY)
    if mode is Mode.RELAY_ONLY:
        assert names == [Strategy.RELAY]
    if Strategy.RELAY in names:
        relay = plan.steps[names.index(Strategy.RELAY)]
        long_shot = (ours == pb.SYMMETRIC) != (peers == pb.SYMMETRIC) and set(names) <= {
            Strategy.TCP_PUNCH, Strategy.UDP_PUNCH, Strategy.RELAY}
        expected = 0.0 if len(names) == 1 else RELAY_STAGGER_LONG_SHOT if long_shot else RELAY_STAGGER
        assert relay.delay == expected
    assert all(s.budget > 0 for s in plan.steps)
    if ours == pb.SYMMETRIC and peers == pb.SYMMETRIC:
        assert Strategy.UDP_PUNCH not in names and Strategy.TCP_PUNCH not in names
    if not udp:
        assert Strategy.UDP_PUNCH not in names
    if not tcp:
        assert Strategy.TCP_PUNCH not in names
    if not ipv6:
        assert Strategy.IPV6 not in names


def test_every_combination_has_a_path_unless_direct_only_and_hopeless() -> None:
    for ours, peers, lan, v6 in itertools.product(NATS, NATS, (False, True), (False, True)):
        plan = make_plan(Situation(ours, peers, lan, True, True, v6))
        assert plan.steps, (ours, peers, lan, v6)


def test_a_random_symmetric_side_facing_a_port_restricted_cone_goes_relay_at_once() -> None:
    """Measured: no punch can meet (the cone lets in only the port it sent to, the symmetric side's
    port toward us is random), so the relay does not wait for a stagger."""
    sit = Situation(pb.ASYMMETRIC, pb.SYMMETRIC, our_udp=True, peer_udp=True, our_behavior=CONE,
                    peer_behavior=SYM_RANDOM)
    plan = make_plan(sit)
    assert plan.strategies() == [Strategy.RELAY] and plan.steps[0].delay == 0
    skipped = dict(plan.skipped)
    assert skipped[Strategy.UDP_PUNCH].startswith("cannot meet: the peer maps per destination with random ports")
    assert skipped[Strategy.TCP_PUNCH].startswith("cannot meet: one side maps per destination")


def test_a_full_cone_facing_a_symmetric_side_gets_the_whole_stagger() -> None:
    """The peer-reflexive punch will meet: the relay need not hurry (it used to join after 0.5 s and win
    on a loaded machine)."""
    sit = Situation(pb.SYMMETRIC, pb.ASYMMETRIC, our_udp=True, peer_udp=True, our_behavior=SYM_RANDOM,
                    peer_behavior=FULL_CONE)
    plan = make_plan(sit)
    assert Strategy.UDP_PUNCH in plan.strategies() and Strategy.TCP_PUNCH in plan.strategies()
    assert plan.steps[-1].delay == RELAY_STAGGER


def test_a_sequential_symmetric_side_is_predicted_not_given_up() -> None:
    sit = Situation(pb.SYMMETRIC, pb.ASYMMETRIC, our_udp=True, peer_udp=True, our_behavior=SYM_SEQ,
                    peer_behavior=CONE)
    plan = make_plan(sit)
    assert Strategy.UDP_PUNCH in plan.strategies() and Strategy.TCP_PUNCH not in plan.strategies()
    assert plan.steps[-1].delay == RELAY_STAGGER_LONG_SHOT


def test_unmeasured_behaviour_changes_nothing() -> None:
    for nats in itertools.product(NATS, NATS):
        sit = Situation(*nats, our_udp=True, peer_udp=True)
        assert make_plan(sit) == make_plan(Situation(*nats, our_udp=True, peer_udp=True, peer_behavior=NatBehavior()))
