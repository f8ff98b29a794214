"""NAT behaviour from the probe's answers, and what two behaviours allow (agent/wire/nat_behavior.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.proto import rendezvous_pb2 as pb
from agent.wire.nat_behavior import MAX_STEP, MappingSample, NatBehavior, classify, punch_outlook, tcp_outlook

NB = pb.NatBehavior
L0, L1 = 40001, 40002  # the two sockets' local ports


def samples(*mapped: int) -> list[MappingSample]:
    """Answers in probe order: socket 0 to ports 0 and 1, then socket 1 to ports 0 and 1."""
    keys = [(0, 0, L0), (0, 1, L0), (1, 0, L1), (1, 1, L1)]
    return [MappingSample(s, p, local, m) for (s, p, local), m in zip(keys, mapped, strict=False)]


CONE = NatBehavior(NB.ENDPOINT_INDEPENDENT, NB.PRESERVING, 0, NB.PORT_DEPENDENT)
FULL_CONE = NatBehavior(NB.ENDPOINT_INDEPENDENT, NB.PRESERVING, 0, NB.OPEN)
SYM_RANDOM = NatBehavior(NB.ENDPOINT_DEPENDENT, NB.RANDOM, 0, NB.PORT_DEPENDENT)
SYM_SEQ = NatBehavior(NB.ENDPOINT_DEPENDENT, NB.SEQUENTIAL, 1, NB.PORT_DEPENDENT)
BLOCKED = NatBehavior(udp_blocked=True)
UNKNOWN = NatBehavior()


@pytest.mark.parametrize(
    ("mapped", "filtering_open", "want"),
    [
        # masquerade (the lab's cone): ports kept, one per socket
        ((L0, L0, L1, L1), False, CONE),
        # a 1:1 full cone (the lab's fullcone): the same, and the other port's answer gets in
        ((L0, L0, L1, L1), True, FULL_CONE),
        # masquerade fully-random (the lab's symmetric)
        ((31000, 52011, 7003, 44999), False, SYM_RANDOM),
        # snat to numgen inc (the lab's sequential): consecutive ports
        ((30000, 30001, 30002, 30003), False, SYM_SEQ),
        # ... with other flows in between: the smallest step
        ((30000, 30002, 30003, 30006), False, NatBehavior(NB.ENDPOINT_DEPENDENT, NB.SEQUENTIAL, 1, NB.PORT_DEPENDENT)),
        # ... wrapping around the port space
        ((65534, 65535, 0, 1), False, NatBehavior(NB.ENDPOINT_DEPENDENT, NB.SEQUENTIAL, 1, NB.PORT_DEPENDENT)),
        # a cone that does not keep ports but hands them out in order
        ((20000, 20000, 20002, 20002), None, NatBehavior(NB.ENDPOINT_INDEPENDENT, NB.SEQUENTIAL, 2, 0)),
        # a cone with random ports
        ((20000, 20000, 9000, 9000), False, NatBehavior(NB.ENDPOINT_INDEPENDENT, NB.RANDOM, 0, NB.PORT_DEPENDENT)),
        # no public port for a server port: mapping unknown
        ((L0,), False, NatBehavior(filtering=NB.PORT_DEPENDENT)),
        # the second socket unanswered: allocation from the first socket's two mappings (symmetric)
        ((30000, 30005), False, NatBehavior(NB.ENDPOINT_DEPENDENT, NB.SEQUENTIAL, 5, NB.PORT_DEPENDENT)),
        # going backwards is not sequential
        ((30005, 30004, 30003, 30002), False, NatBehavior(NB.ENDPOINT_DEPENDENT, NB.RANDOM, 0, NB.PORT_DEPENDENT)),
    ],
)
def test_classify(mapped: tuple[int, ...], filtering_open: bool | None, want: NatBehavior) -> None:
    assert classify(samples(*mapped), filtering_open) == want


def test_the_last_sample_missing_still_classifies() -> None:
    got = classify(samples(30000, 30001, 30002), False)
    assert (got.mapping, got.allocation, got.step) == (NB.ENDPOINT_DEPENDENT, NB.SEQUENTIAL, 1)


@given(st.lists(st.integers(1, 65535), min_size=0, max_size=4), st.none() | st.booleans())
def test_classify_never_raises_and_says_sequential_only_with_a_step(ports: list[int], opened: bool | None) -> None:
    got = classify(samples(*ports), opened)
    assert (got.allocation == NB.SEQUENTIAL) == (0 < got.step <= MAX_STEP)
    assert NatBehavior.from_pb(got.to_pb()) == got


def test_a_hostile_peer_behaviour_is_clamped() -> None:
    msg = pb.NatBehavior(step=1_000_000, allocation=NB.SEQUENTIAL)
    msg.mapping = 77  # type: ignore[assignment]  # an enum value this version does not know
    got = NatBehavior.from_pb(msg)
    assert (got.mapping, got.step) == (NB.MAPPING_UNKNOWN, 0)
    assert not got.predictable


@pytest.mark.parametrize(
    ("a", "b", "possible", "phrase"),
    [
        (CONE, CONE, True, "both map endpoint-independently"),
        (SYM_RANDOM, SYM_RANDOM, False, "both sides map per destination"),
        (SYM_RANDOM, FULL_CONE, True, "peer-reflexive"),
        (FULL_CONE, SYM_RANDOM, True, "peer-reflexive"),
        (SYM_RANDOM, CONE, False, "random ports and the other side lets in only the port it sent to"),
        (CONE, SYM_RANDOM, False, "the peer maps per destination with random ports"),
        (CONE, SYM_SEQ, True, "sequential ports (step 1): predict them"),
        (BLOCKED, CONE, False, "UDP does not get through on our side"),
        (CONE, BLOCKED, False, "on the peer"),
        (UNKNOWN, SYM_RANDOM, True, "not measured"),
        (CONE, NatBehavior(NB.ENDPOINT_DEPENDENT, NB.RANDOM, 0, 0), False, "random"),
        (NatBehavior(NB.ENDPOINT_INDEPENDENT), SYM_RANDOM, True, "filtering is unknown"),
    ],
)
def test_punch_outlook(a: NatBehavior, b: NatBehavior, possible: bool, phrase: str) -> None:
    got = punch_outlook(a, b)
    assert got.possible is possible
    assert phrase in got.how


def test_prediction_can_be_left_out() -> None:
    assert not punch_outlook(CONE, SYM_SEQ, predict=False).possible


@pytest.mark.parametrize(
    ("ours", "theirs", "a", "b", "possible"),
    [
        (pb.ASYMMETRIC, pb.ASYMMETRIC, CONE, CONE, True),
        (pb.SYMMETRIC, pb.SYMMETRIC, SYM_RANDOM, SYM_RANDOM, False),
        (pb.ASYMMETRIC, pb.SYMMETRIC, CONE, SYM_RANDOM, False),
        (pb.ASYMMETRIC, pb.SYMMETRIC, FULL_CONE, SYM_RANDOM, True),
        (pb.SYMMETRIC, pb.ASYMMETRIC, SYM_RANDOM, UNKNOWN, True),
        (pb.UNKNOWN_NAT, pb.SYMMETRIC, CONE, SYM_RANDOM, True),
    ],
)
def test_tcp_outlook(ours: int, theirs: int, a: NatBehavior, b: NatBehavior, possible: bool) -> None:
    assert tcp_outlook(ours, theirs, a, b).possible is possible


def test_describe() -> None:
    assert SYM_SEQ.describe() == "symmetric, sequential ports (step 1), port-restricted filtering"
    assert FULL_CONE.describe() == "cone, port-preserving, open filtering"
    assert BLOCKED.describe() == "UDP does not get through"
    assert UNKNOWN.describe() == "unknown"
