"""What a NAT does with UDP, classified from what the server saw, and which punches that allows (sans-IO).

RustDesk knows one bit per side (its TCP two-port test: "ASYMMETRIC" or "SYMMETRIC") and relays
as soon as either side is symmetric. RFC 4787/5780 name what decides whether a hole punch can work:

* **mapping**: does one local socket keep one public port whatever the destination
  (endpoint-independent, a "cone"), or get a new one per destination (endpoint-dependent,
  "symmetric")? Measured by asking the server's two UDP ports from one socket.
* **allocation**, for new mappings: the local port kept (preserving), the last one plus a small step
  (sequential: the next ones can be predicted), or anything (random). Measured from the order of the
  new mappings of two sockets to the two ports.
* **filtering**: does a packet from a port we never sent to get in (open: a full or
  address-restricted cone) or only from the exact address and port we sent to (port-dependent:
  a port-restricted cone or a symmetric NAT)? Measured by asking the server to answer from its
  other port. A second server address would split "open" into full cone (endpoint-independent
  filtering) and address-restricted, and an endpoint-dependent mapping into address-dependent and
  address-and-port-dependent; neither changes a punch's outcome between two NATs, because a punch
  always comes from the peer's address, so one host with two ports is enough.

`punch_outlook` turns two behaviours into the answer the plan and the server need: can a UDP
(or TCP) punch meet at all, and how.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Literal

from agent.proto import rendezvous_pb2 as pb

NB = pb.NatBehavior
MAX_STEP = 64
"""Deltas up to this between consecutive new mappings count as sequential (other flows through the
same NAT take ports in between, so the step seen is rarely exactly 1)."""

@dataclass(frozen=True)
class NatBehavior:
    mapping: int = NB.MAPPING_UNKNOWN
    allocation: int = NB.ALLOCATION_UNKNOWN
    step: int = 0
    filtering: int = NB.FILTERING_UNKNOWN
    udp_blocked: bool = False

    @property
    def known(self) -> bool:
        return self.udp_blocked or self.mapping != NB.MAPPING_UNKNOWN

    @property
    def cone(self) -> bool:
        return self.mapping == NB.ENDPOINT_INDEPENDENT

    @property
    def symmetric(self) -> bool:
        return self.mapping == NB.ENDPOINT_DEPENDENT

    @property
    def predictable(self) -> bool:
        return self.symmetric and self.allocation == NB.SEQUENTIAL and self.step != 0

    def to_pb(self) -> pb.NatBehavior:
        return pb.NatBehavior(
            mapping=self.mapping,  # type: ignore[arg-type]
            allocation=self.allocation,  # type: ignore[arg-type]
            step=self.step,
            filtering=self.filtering,  # type: ignore[arg-type]
            udp_blocked=self.udp_blocked,
        )

    @classmethod
    def from_pb(cls, msg: Any) -> NatBehavior:
        """A peer's (or the server's word for a peer's) behaviour; unknown values become unknown."""
        mapping = msg.mapping if msg.mapping in NB.Mapping.values() else NB.MAPPING_UNKNOWN
        allocation = msg.allocation if msg.allocation in NB.Allocation.values() else NB.ALLOCATION_UNKNOWN
        filtering = msg.filtering if msg.filtering in NB.Filtering.values() else NB.FILTERING_UNKNOWN
        step = int(msg.step) if allocation == NB.SEQUENTIAL and 0 < abs(msg.step) <= MAX_STEP else 0
        return cls(int(mapping), int(allocation), step, int(filtering), bool(msg.udp_blocked))

    @classmethod
    def from_wire(cls, data: bytes) -> NatBehavior:
        """Our own behaviour as the coordinator hands it out (serialized: it crosses actors)."""
        return cls.from_pb(pb.NatBehavior.FromString(data))

    def as_dict(self) -> dict[str, Any]:
        return {
            "mapping": NB.Mapping.Name(self.mapping),
            "allocation": NB.Allocation.Name(self.allocation),
            "step": self.step,
            "filtering": NB.Filtering.Name(self.filtering),
            "udp_blocked": self.udp_blocked,
        }

    def describe(self) -> str:
        """One line for people: what the NAT does with UDP."""
        if self.udp_blocked:
            return "UDP does not get through"
        if not self.known:
            return "unknown"
        mapping = "cone" if self.cone else "symmetric"
        allocations: dict[int, str] = {
            NB.PRESERVING: "port-preserving",
            NB.SEQUENTIAL: f"sequential ports (step {self.step})",
            NB.RANDOM: "random ports",
        }
        filterings: dict[int, str] = {NB.OPEN: "open filtering", NB.PORT_DEPENDENT: "port-restricted filtering"}
        allocation = allocations.get(self.allocation, "ports not measured")
        filtering = filterings.get(self.filtering, "filtering not measured")
        return f"{mapping}, {allocation}, {filtering}"


UNMEASURED = NatBehavior()


@dataclass(frozen=True)
class MappingSample:
    """One answer of the mapping probe: which local socket asked which server port, and what the server saw."""

    socket: int
    port_index: int
    local_port: int
    mapped_port: int


def classify(samples: list[MappingSample], filtering_open: bool | None) -> NatBehavior:
    """The behaviour from the probe's answers, in the order the mappings were created.

    `samples` are socket 0 to port 0 and 1, then socket 1 to port 0 and 1 (any missing answer leaves
    what it would have decided unknown); `filtering_open` is whether the other-port answer got in
    (None: not measured).
    """
    by = {(s.socket, s.port_index): s for s in samples}
    first, second = by.get((0, 0)), by.get((0, 1))
    if first is None or second is None:
        return NatBehavior(filtering=_filtering(filtering_open))
    mapping = NB.ENDPOINT_INDEPENDENT if first.mapped_port == second.mapped_port else NB.ENDPOINT_DEPENDENT
    # the new mappings, in creation order: a cone makes one per socket, a symmetric NAT one per destination
    order = [(0, 0), (1, 0)] if mapping == NB.ENDPOINT_INDEPENDENT else [(0, 0), (0, 1), (1, 0), (1, 1)]
    made = [by[k] for k in order if k in by]
    allocation, step = NB.ALLOCATION_UNKNOWN, 0
    if all(s.mapped_port == s.local_port for s in made):
        allocation = NB.PRESERVING
    elif len(made) >= 2:
        deltas = [(b.mapped_port - a.mapped_port) % 65536 for a, b in itertools.pairwise(made)]
        if all(0 < d <= MAX_STEP for d in deltas):
            allocation, step = NB.SEQUENTIAL, min(deltas)
        else:
            allocation = NB.RANDOM
    return NatBehavior(int(mapping), int(allocation), step, _filtering(filtering_open))


def _filtering(opened: bool | None) -> int:
    if opened is None:
        return int(NB.FILTERING_UNKNOWN)
    return int(NB.OPEN if opened else NB.PORT_DEPENDENT)


PREDICTED_PORTS = 24
"""Ports of a sequential NAT punched beside the one the server saw: new flows of the peer's network
(its agent's own TCP punch and rendezvous connections among them) take ports between that mapping
and the one its punch gets; the lab sees 1-6 of them."""


def predicted_ports(seen: int, peer: NatBehavior, ours: NatBehavior, count: int = PREDICTED_PORTS) -> list[int]:
    """The ports a sequential NAT will give the peer's next mappings after `seen` (the one the server
    saw from the peer's punch socket): worth punching only from a cone (a symmetric side would need
    its own prediction), never more than `count`."""
    if not peer.predictable or ours.symmetric or not 0 < seen <= 0xFFFF:
        return []
    ports = []
    for k in range(1, count + 1):
        port = (seen + peer.step * k) % 65536
        if port:
            ports.append(port)
    return ports


@dataclass(frozen=True)
class Outlook:
    possible: bool
    how: str
    """Why it can work (or why not), one phrase for ops and the session's attempt list."""
    sure: bool = False
    """Measured on both sides, and the theory says it meets (not a guess, not a prediction)."""


def punch_outlook(ours: NatBehavior, theirs: NatBehavior, *, predict: bool = True) -> Outlook:
    """Can a UDP hole punch between these two NATs meet, by theory? Unknown behaviour counts as
    possible: a wrong "no" would send a working pair to the relay for good."""
    if ours.udp_blocked or theirs.udp_blocked:
        both = ours.udp_blocked and theirs.udp_blocked
        side = "both sides" if both else "our side" if ours.udp_blocked else "the peer"
        return Outlook(False, f"UDP does not get through on {side}")
    if not ours.known or not theirs.known:
        return Outlook(True, "a NAT not measured yet: try")
    if ours.cone and theirs.cone:
        return Outlook(True, "both map endpoint-independently", sure=True)
    if ours.symmetric and theirs.symmetric:
        return Outlook(False, "both sides map per destination (symmetric)")
    sym, cone = (ours, theirs) if ours.symmetric else (theirs, ours)
    who = "our side" if sym is ours else "the peer"
    if cone.filtering == NB.OPEN:
        return Outlook(
            True, f"{who} maps per destination, but the other side lets in any port (peer-reflexive)", sure=True
        )
    if cone.filtering == NB.FILTERING_UNKNOWN:
        return Outlook(True, f"{who} maps per destination, the other side's filtering is unknown: try")
    if predict and sym.predictable:
        return Outlook(True, f"{who} maps per destination with sequential ports (step {sym.step}): predict them")
    return Outlook(
        False,
        f"{who} maps per destination with {'random' if sym.allocation == NB.RANDOM else 'unpredictable'} ports "
        "and the other side lets in only the port it sent to",
    )


BirthdayRole = Literal["spray", "probe"]


def birthday_role(ours: NatBehavior, theirs: NatBehavior) -> BirthdayRole | None:
    """Our part in birthday probing (agent/strategies/birthday_core.py) with this peer: "spray" (the
    random-port symmetric side), "probe" (the cone side), or None when it is not the way. A cone that
    lets any port in needs none (the plain punch meets through the peer-reflexive address)."""

    def random_symmetric(b: NatBehavior) -> bool:
        return b.symmetric and not b.predictable

    if ours.udp_blocked or theirs.udp_blocked:
        return None
    if random_symmetric(ours) and theirs.cone and theirs.filtering != NB.OPEN:
        return "spray"
    if ours.cone and ours.filtering != NB.OPEN and random_symmetric(theirs):
        return "probe"
    return None


def tcp_outlook(our_nat: int, peer_nat: int, ours: NatBehavior, theirs: NatBehavior) -> Outlook:
    """The same theory for a TCP punch: the mapping from the TCP two-port test (RustDesk's NatType),
    the filtering from the UDP measurement (NATs filter both the same way as a rule)."""
    if our_nat == pb.UNKNOWN_NAT or peer_nat == pb.UNKNOWN_NAT:
        return Outlook(True, "a NAT not measured yet: try")
    if our_nat == pb.ASYMMETRIC and peer_nat == pb.ASYMMETRIC:
        return Outlook(True, "both map endpoint-independently")
    if our_nat == pb.SYMMETRIC and peer_nat == pb.SYMMETRIC:
        return Outlook(False, "both sides map per destination (symmetric)")
    cone = theirs if our_nat == pb.SYMMETRIC else ours
    if cone.filtering == NB.PORT_DEPENDENT:
        return Outlook(False, "one side maps per destination and the other lets in only the port it sent to")
    return Outlook(True, "one side maps per destination, the other may let it in")
