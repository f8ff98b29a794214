"""NAT classification from observed ports, and the probe's timing schedules, sans-IO.

The probe (agent/nat/probe.py) owns the sockets and collects what the rendezvous
server reported; everything that decides what those numbers mean lives here so
every combination, including failures and nonsense answers, is testable without
a network. The rules are RustDesk's (`test_nat_type_`): two TCP connections from
the same local address to two server ports; the same mapped source port on both
means the NAT maps endpoint-independently (hbb calls it ASYMMETRIC), different
ports mean SYMMETRIC (hole punching will not work, use the relay).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from agent.proto import rendezvous_pb2 as pb
from agent.wire.nat_behavior import UNMEASURED, NatBehavior


class NatType(IntEnum):
    """hbb.NatType, with the wire values (kept in step with the generated enum by a test)."""

    UNKNOWN_NAT = pb.UNKNOWN_NAT
    ASYMMETRIC = pb.ASYMMETRIC
    SYMMETRIC = pb.SYMMETRIC


def _valid_port(port: int | None) -> bool:
    return port is not None and 0 < port <= 0xFFFF


@dataclass(frozen=True)
class TcpObservation:
    """What one TCP TestNat exchange produced: the server's view of our port, or why not."""

    mapped_port: int | None = None
    local_port: int | None = None
    error: str = ""
    local_ip: str = ""
    observed_ip: str = ""
    """The source IP the server saw (our public address behind a NAT); "" from a server that does not say."""
    connect_ms: float | None = None
    """How long the TCP handshake with the server took: one round trip."""


def classify(first: TcpObservation, second: TcpObservation) -> tuple[NatType, str]:
    """NAT type and the reason it is unknown ("" when known).

    Only a comparison of two valid mapped ports taken from the same local port
    says anything; every other case is UNKNOWN with a reason, so the caller
    retries instead of guessing (a wrong SYMMETRIC forces every session onto the
    relay, a wrong ASYMMETRIC wastes the punch budget).
    """
    if first.error:
        return NatType.UNKNOWN_NAT, first.error
    if second.error:
        return NatType.UNKNOWN_NAT, second.error
    if not _valid_port(first.mapped_port) or not _valid_port(second.mapped_port):
        return NatType.UNKNOWN_NAT, (
            f"server reported an unusable port (main port: {first.mapped_port}, NAT-test port: {second.mapped_port})"
        )
    if first.local_port != second.local_port or not _valid_port(first.local_port):
        return NatType.UNKNOWN_NAT, (
            f"second connection did not reuse the local port ({first.local_port} then {second.local_port})"
        )
    if first.mapped_port == second.mapped_port:
        return NatType.ASYMMETRIC, ""
    return NatType.SYMMETRIC, ""


@dataclass(frozen=True)
class UdpObservation:
    """Result of the UDP mapping probe: the server's view of our UDP port, or why none."""

    mapped_port: int | None = None
    local_port: int | None = None
    error: str = ""
    observed_ip: str = ""

    @property
    def usable(self) -> bool:
        return not self.error and _valid_port(self.mapped_port)


@dataclass(frozen=True)
class Verdict:
    """Everything one measurement learned; `as_dict()` is what status pages show."""

    nat_type: NatType
    port1: int | None
    port2: int | None
    local_tcp_port: int | None
    udp_mapped_port: int | None
    udp_local_port: int | None
    measured_at: float
    error: str = ""
    udp_error: str = ""
    public_ip: str = ""
    """The address the server saw our TCP connections come from."""
    udp_public_ip: str = ""
    server_rtt_ms: float | None = None
    behavior: NatBehavior = UNMEASURED
    """What the NAT does with UDP: mapping, allocation, filtering (agent/wire/nat_behavior.py)."""

    @property
    def nat_name(self) -> str:
        return self.nat_type.name

    @property
    def known(self) -> bool:
        return self.nat_type != NatType.UNKNOWN_NAT

    def as_dict(self) -> dict[str, Any]:
        return {
            "nat_type": int(self.nat_type),
            "nat_name": self.nat_name,
            "port1": self.port1,
            "port2": self.port2,
            "local_tcp_port": self.local_tcp_port,
            "udp_mapped_port": self.udp_mapped_port,
            "udp_local_port": self.udp_local_port,
            "measured_at": self.measured_at,
            "error": self.error,
            "udp_error": self.udp_error,
            "public_ip": self.public_ip,
            "udp_public_ip": self.udp_public_ip,
            "server_rtt_ms": self.server_rtt_ms,
            "behavior": self.behavior.as_dict(),
            "behavior_text": self.behavior.describe(),
        }


def make_verdict(
    first: TcpObservation,
    second: TcpObservation,
    udp: UdpObservation,
    measured_at: float,
    behavior: NatBehavior = UNMEASURED,
) -> Verdict:
    """Combine the two TCP exchanges and the UDP probes into one Verdict."""
    nat_type, error = classify(first, second)
    if udp.usable:
        udp_mapped, udp_error = udp.mapped_port, ""
    else:
        udp_mapped = None
        udp_error = udp.error or f"server reported an unusable UDP port ({udp.mapped_port})"
    return Verdict(
        nat_type=nat_type,
        port1=first.mapped_port,
        port2=second.mapped_port,
        local_tcp_port=first.local_port,
        udp_mapped_port=udp_mapped,
        udp_local_port=udp.local_port,
        measured_at=measured_at,
        error=error,
        udp_error=udp_error,
        public_ip=_ip_text(first.observed_ip),
        udp_public_ip=_ip_text(udp.observed_ip) if udp.usable else "",
        server_rtt_ms=first.connect_ms,
        behavior=behavior,
    )


def _ip_text(text: str) -> str:
    """The server's word for our address, shown to people: an IP address or nothing."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return ""
    return "" if getattr(ip, "scope_id", None) else str(ip)  # a zone ("%eth0...") is free text


def udp_probe_offsets(
    give_up: float = 2.0, first_gap: float = 0.02, factor: float = 1.5, cap: float = 0.2
) -> Iterator[float]:
    """Seconds after the start at which the UDP probe sends (RustDesk `test_udp_uat`).

    Two sends at once (a lost first datagram is common while a NAT creates the
    mapping), then gaps of 20 ms growing x1.5 up to 200 ms, until `give_up`.
    """
    if give_up <= 0:
        return
    yield 0.0
    yield 0.0
    t, gap = 0.0, first_gap
    while t + gap < give_up:
        t += gap
        yield t
        gap = min(gap * factor, cap)


def retry_delay(previous: float | None, cap: float = 300.0) -> float:
    """Next wait before re-measuring an unknown NAT type: 1, 3, 7, 15, ... s (i = 2i + 1), capped."""
    if previous is None or previous <= 0:
        return 1.0
    return min(previous * 2 + 1, cap)


def next_measurement_delay(
    verdict: Verdict | None, previous_retry: float | None, interval: float
) -> tuple[float, float | None]:
    """(seconds to sleep, retry state to pass next time): RustDesk's growing retries until known, then `interval`."""
    if verdict is not None and verdict.known:
        return interval, None
    delay = min(retry_delay(previous_retry), max(interval, 1.0))
    return delay, delay
