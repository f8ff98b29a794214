"""NAT classification for every combination of observations, verdicts, and the probe schedules."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.nat.probe_core import (
    NatType,
    TcpObservation,
    UdpObservation,
    Verdict,
    classify,
    make_verdict,
    next_measurement_delay,
    retry_delay,
    udp_probe_offsets,
)
from agent.proto import rendezvous_pb2 as pb

T = TcpObservation


def test_enum_matches_the_wire() -> None:
    assert {n.name: int(n) for n in NatType} == dict(pb.NatType.items())


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (T(40000, 5000), T(40000, 5000), NatType.ASYMMETRIC),  # endpoint-independent mapping
        (T(5000, 5000), T(5000, 5000), NatType.ASYMMETRIC),  # no NAT at all
        (T(40000, 5000), T(40001, 5000), NatType.SYMMETRIC),  # new mapping per destination
        (T(5000, 5000), T(40001, 5000), NatType.SYMMETRIC),
    ],
)
def test_two_good_observations(first: T, second: T, expected: NatType) -> None:
    assert classify(first, second) == (expected, "")


@pytest.mark.parametrize(
    ("first", "second", "reason"),
    [
        (T(error="main port 192.0.2.1:21116: connection refused"), T(40000, 5000), "main port"),
        (T(40000, 5000), T(error="NAT-test port 192.0.2.1:21115: timed out"), "NAT-test port"),
        (T(error="a"), T(error="b"), "a"),  # the first failure is the one reported
        (T(0, 5000), T(0, 5000), "unusable port"),  # server reported port 0 both times
        (T(0, 5000), T(40000, 5000), "unusable port"),
        (T(40000, 5000), T(0, 5000), "unusable port"),
        (T(None, 5000), T(40000, 5000), "unusable port"),
        (T(70000, 5000), T(70000, 5000), "unusable port"),
        (T(-1, 5000), T(-1, 5000), "unusable port"),
        (T(40000, 5000), T(40000, 5001), "did not reuse the local port"),
        (T(40000, None), T(40000, None), "did not reuse the local port"),
        (T(40000, 0), T(40000, 0), "did not reuse the local port"),
    ],
)
def test_failures_are_unknown_with_a_reason(first: T, second: T, reason: str) -> None:
    nat, why = classify(first, second)
    assert nat == NatType.UNKNOWN_NAT
    assert reason in why


PORTS = [None, -1, 0, 1, 5000, 40000, 65535, 65536]


@pytest.mark.parametrize(("p1", "p2", "l1", "l2"), list(itertools.product(PORTS, PORTS, [None, 0, 5000], [0, 5000])))
def test_every_combination_is_consistent(p1: int | None, p2: int | None, l1: int | None, l2: int | None) -> None:
    nat, why = classify(T(p1, l1), T(p2, l2))
    good = all(p is not None and 0 < p <= 65535 for p in (p1, p2)) and l1 == l2 == 5000
    if not good:
        assert (nat, bool(why)) == (NatType.UNKNOWN_NAT, True)
    else:
        assert why == ""
        assert nat == (NatType.ASYMMETRIC if p1 == p2 else NatType.SYMMETRIC)


@given(st.integers(), st.integers(), st.integers(), st.integers(), st.text(max_size=5), st.text(max_size=5))
def test_classify_never_raises(p1: int, p2: int, l1: int, l2: int, e1: str, e2: str) -> None:
    nat, why = classify(T(p1, l1, e1), T(p2, l2, e2))
    assert nat in NatType
    assert (nat == NatType.UNKNOWN_NAT) == bool(why)


def test_verdict_combines_tcp_and_udp() -> None:
    first = T(40000, 5000, observed_ip="198.51.100.7", connect_ms=12.5)
    udp = UdpObservation(41000, 6000, observed_ip="198.51.100.7")
    v = make_verdict(first, T(40000, 5000, observed_ip="198.51.100.7"), udp, measured_at=123.5)
    assert v.known
    assert (v.nat_type, v.nat_name) == (NatType.ASYMMETRIC, "ASYMMETRIC")
    assert v.as_dict() == {
        "nat_type": 1,
        "nat_name": "ASYMMETRIC",
        "port1": 40000,
        "port2": 40000,
        "local_tcp_port": 5000,
        "udp_mapped_port": 41000,
        "udp_local_port": 6000,
        "measured_at": 123.5,
        "error": "",
        "udp_error": "",
        "public_ip": "198.51.100.7",
        "udp_public_ip": "198.51.100.7",
        "server_rtt_ms": 12.5,
        "behavior": {
            "mapping": "MAPPING_UNKNOWN",
            "allocation": "ALLOCATION_UNKNOWN",
            "step": 0,
            "filtering": "FILTERING_UNKNOWN",
            "udp_blocked": False,
        },
        "behavior_text": "unknown",
    }


@pytest.mark.parametrize("said", ["", "not an ip", "1.2.3.4\x1b[2J", "::1%eth0" + "x" * 500, "300.1.1.1"])
def test_a_servers_word_for_our_address_is_an_ip_or_nothing(said: str) -> None:
    """The observed IP goes onto people's terminals: anything but an address is dropped."""
    v = make_verdict(T(1, 2, observed_ip=said), T(1, 2), UdpObservation(3, 4, observed_ip=said), 0.0)
    assert (v.public_ip, v.udp_public_ip) == ("", "")


def test_verdict_without_udp() -> None:
    v = make_verdict(T(40000, 5000), T(40001, 5000), UdpObservation(None, 6000, "no UDP answer within 2 s"), 1.0)
    assert v.nat_type == NatType.SYMMETRIC
    assert v.udp_mapped_port is None
    assert v.udp_local_port == 6000
    assert v.udp_error == "no UDP answer within 2 s"


@pytest.mark.parametrize("port", [0, -3, 65536, None])
def test_verdict_with_nonsense_udp_port(port: int | None) -> None:
    v = make_verdict(T(1, 2), T(1, 2), UdpObservation(port, 6000), 1.0)
    assert v.udp_mapped_port is None
    assert "unusable UDP port" in v.udp_error


def test_verdict_for_a_dead_server() -> None:
    err = "main port 127.0.0.1:9: connection refused"
    v = make_verdict(T(error=err), T(error="not tried"), UdpObservation(None, 6000, "no UDP answer"), 2.0)
    assert not v.known
    assert v.error == err
    assert v.as_dict()["nat_name"] == "UNKNOWN_NAT"


def test_udp_probe_schedule_matches_rustdesk() -> None:
    offsets = list(udp_probe_offsets(2.0))
    assert offsets[:2] == [0.0, 0.0]
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(offsets[1:])]
    assert gaps[:6] == [0.02, 0.03, 0.045, 0.0675, 0.10125, 0.151875]
    assert set(gaps[7:]) == {0.2}
    assert offsets[-1] < 2.0
    assert len(offsets) < 20  # a handful of datagrams, not a flood
    assert list(udp_probe_offsets(0)) == []
    assert list(udp_probe_offsets(0.01)) == [0.0, 0.0]


def test_retry_schedule_1_3_7_15_capped() -> None:
    delays, prev = [], None
    for _ in range(12):
        prev = retry_delay(prev)
        delays.append(prev)
    assert delays[:6] == [1, 3, 7, 15, 31, 63]
    assert delays[-1] == 300
    assert retry_delay(0) == 1


def known() -> Verdict:
    return make_verdict(T(1, 1), T(1, 1), UdpObservation(1, 1), 0.0)


def unknown() -> Verdict:
    return make_verdict(T(error="x"), T(), UdpObservation(), 0.0)


def test_measurement_delays() -> None:
    state = None
    seen = []
    for _ in range(4):
        delay, state = next_measurement_delay(unknown(), state, 300.0)
        seen.append(delay)
    assert seen == [1, 3, 7, 15]
    assert next_measurement_delay(known(), state, 300.0) == (300.0, None)
    assert next_measurement_delay(None, None, 300.0) == (1.0, 1.0)
    # retries never wait longer than the periodic interval
    delay, state = next_measurement_delay(unknown(), 63.0, 30.0)
    assert delay == 30.0
