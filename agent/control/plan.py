"""The connection plan: which strategies to race, when each starts, and how long each may take.

Pure: from what both sides know (NAT verdicts, same LAN, IPv6, UDP reachability)
and the user's policy, decide the race. RustDesk tries its paths in series with
18 s timeouts and gives up on direct as soon as either side is symmetric; we
start every path that theory allows at once and the relay after a short stagger
(Happy Eyeballs), so a user waits for the fastest working path, never for the sum
of the failures. The reason for every choice is kept, so `punchthrough-ops
sessions` can say why a strategy was or was not tried.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.proto import rendezvous_pb2 as pb
from agent.wire.nat_behavior import UNMEASURED, NatBehavior, punch_outlook, tcp_outlook


class Strategy(enum.StrEnum):
    LAN = "lan"
    IPV6 = "ipv6"
    TCP_PUNCH = "tcp_punch"
    UDP_PUNCH = "udp_punch"
    DIRECT = "direct"
    RELAY = "relay"


class Mode(enum.StrEnum):
    AUTO = "auto"
    DIRECT_ONLY = "direct-only"
    RELAY_ONLY = "relay-only"


POLICY_WORDS = ("auto", "direct-only", "relay-only", "disable-udp", "disable-tcp-punch", "disable-ipv6")


@dataclass(frozen=True)
class Policy:
    mode: Mode = Mode.AUTO
    udp: bool = True
    tcp_punch: bool = True
    ipv6: bool = True

    @classmethod
    def parse(cls, words: str | list[str]) -> Policy:
        """`auto`, `direct-only`, `relay-only`, plus any of `disable-udp`, `disable-tcp-punch`, `disable-ipv6`
        (comma-separated or a list); `relay`/`direct` are accepted as the CLI's short forms."""
        items = [w.strip() for w in (words.split(",") if isinstance(words, str) else words) if w.strip()]
        mode, udp, tcp, v6 = Mode.AUTO, True, True, True
        for w in items:
            if w in ("auto", "direct-only", "relay-only"):
                mode = Mode(w)
            elif w == "relay":
                mode = Mode.RELAY_ONLY
            elif w == "direct":
                mode = Mode.DIRECT_ONLY
            elif w == "disable-udp":
                udp = False
            elif w == "disable-tcp-punch":
                tcp = False
            elif w == "disable-ipv6":
                v6 = False
            else:
                raise ValueError(f"unknown path policy {w!r} (use {', '.join(POLICY_WORDS)})")
        return cls(mode, udp, tcp, v6)

    def allows_path(self, path: str) -> bool:
        """May a stream ride a link that runs on `path` (a strategy name)? The same words that choose
        the strategies of a race choose the links a stream may reuse."""
        if path == Strategy.RELAY:
            return self.mode != Mode.DIRECT_ONLY
        if self.mode == Mode.RELAY_ONLY:
            return False
        return not (
            (path == Strategy.UDP_PUNCH and not self.udp)
            or (path == Strategy.TCP_PUNCH and not self.tcp_punch)
            or (path == Strategy.IPV6 and not self.ipv6)
        )


@dataclass(frozen=True)
class Situation:
    """What the initiator knows when it plans (ours from our NAT probe, the peer's from the server)."""

    our_nat: int = pb.UNKNOWN_NAT
    peer_nat: int = pb.UNKNOWN_NAT
    same_lan: bool = False
    our_udp: bool = False
    """We have a UDP mapping to offer (the NAT probe got an answer)."""
    peer_udp: bool = False
    """The peer answered with a UDP mapping (PunchHoleResponse.is_udp)."""
    v6_both: bool = False
    direct_address: bool = False
    """The user named the peer by IP[:PORT] (direct-server port): no rendezvous at all."""
    our_behavior: NatBehavior = UNMEASURED
    peer_behavior: NatBehavior = UNMEASURED
    """What each NAT does with UDP (agent/wire/nat_behavior.py): whether a punch can meet at all."""


@dataclass(frozen=True)
class Step:
    strategy: Strategy
    delay: float
    """Seconds after the plan starts before this strategy starts (relay: earlier if all others fail)."""
    budget: float
    """Seconds this strategy may take, its authenticated handshake included."""


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    skipped: tuple[tuple[Strategy, str], ...]
    """Strategies not tried, each with the reason (shown in ops)."""

    def strategies(self) -> list[Strategy]:
        return [s.strategy for s in self.steps]


RELAY_STAGGER = 1.0
"""Head start of the direct paths before the relay joins the race (libp2p uses 0.5 s; a punch
through two NATs on a real WAN needs about one RTT to the server plus one to the peer)."""
RELAY_STAGGER_LONG_SHOT = 0.5
"""The relay's head start when the only direct paths left are punches with exactly one side
symmetric: they work only if the other side is a full cone (the peer-reflexive address), which
the lab shows done in under 0.2 s; behind the usual port-restricted cone they cannot work, and
the user should not wait the full stagger for that (libp2p's 0.5 s)."""
LAN_BUDGET = 2.0
PUNCH_BUDGET = 6.0
RELAY_BUDGET = 10.0
DIRECT_BUDGET = 5.0


def _missing_udp_mapping(sit: Situation) -> str:
    if sit.our_udp and sit.peer_udp:
        return ""
    side = "either side" if not (sit.our_udp or sit.peer_udp) else "our side" if not sit.our_udp else "the peer's side"
    return f"no UDP mapping on {side}"


def _why_not_punch(sit: Situation, enabled: bool, missing: str, udp: bool) -> str:
    """Why a hole punch (TCP or UDP) is not tried, in the order a user should hear it; "" to try it."""
    if not enabled:
        return "disabled by policy"
    if sit.our_nat == pb.SYMMETRIC and sit.peer_nat == pb.SYMMETRIC:
        return "both sides map per destination (symmetric)"
    if missing:
        return missing
    if sit.same_lan:
        return "same LAN: direct LAN connection instead"
    outlook = (
        punch_outlook(sit.our_behavior, sit.peer_behavior)
        if udp
        else tcp_outlook(sit.our_nat, sit.peer_nat, sit.our_behavior, sit.peer_behavior)
    )
    return "" if outlook.possible else f"cannot meet: {outlook.how}"


def make_plan(sit: Situation, policy: Policy = Policy()) -> Plan:
    steps: list[Step] = []
    skipped: list[tuple[Strategy, str]] = []
    if sit.direct_address:
        if policy.mode is Mode.RELAY_ONLY:
            return Plan((), ((Strategy.DIRECT, "relay-only policy, but the peer was named by address"),))
        return Plan((Step(Strategy.DIRECT, 0.0, DIRECT_BUDGET),), ())
    if policy.mode is Mode.RELAY_ONLY:
        why = "relay-only policy"
        skipped += [(s, why) for s in (Strategy.LAN, Strategy.IPV6, Strategy.TCP_PUNCH, Strategy.UDP_PUNCH)]
        return Plan((Step(Strategy.RELAY, 0.0, RELAY_BUDGET),), tuple(skipped))

    if sit.same_lan:
        steps.append(Step(Strategy.LAN, 0.0, LAN_BUDGET))
    else:
        skipped.append((Strategy.LAN, "not on the same LAN"))
    if not policy.ipv6:
        skipped.append((Strategy.IPV6, "disabled by policy"))
    elif sit.v6_both:
        steps.append(Step(Strategy.IPV6, 0.0, PUNCH_BUDGET))
    else:
        skipped.append((Strategy.IPV6, "no global IPv6 on both sides"))
    for strategy, enabled, missing in (
        (Strategy.TCP_PUNCH, policy.tcp_punch, ""),
        (Strategy.UDP_PUNCH, policy.udp, _missing_udp_mapping(sit)),
    ):
        why = _why_not_punch(sit, enabled, missing, udp=strategy is Strategy.UDP_PUNCH)
        if why:
            skipped.append((strategy, why))
        else:
            # (UDP: a symmetric side facing an endpoint-independent one can still meet it through the
            # peer-reflexive address; RustDesk gives up here.)
            steps.append(Step(strategy, 0.0, PUNCH_BUDGET))
    if policy.mode is Mode.DIRECT_ONLY:
        skipped.append((Strategy.RELAY, "direct-only policy"))
    else:
        delay = RELAY_STAGGER if steps else 0.0
        one_symmetric = (sit.our_nat == pb.SYMMETRIC) != (sit.peer_nat == pb.SYMMETRIC)
        only_punches = all(s.strategy in (Strategy.TCP_PUNCH, Strategy.UDP_PUNCH) for s in steps)
        # a measured cone that lets any port in will meet the symmetric side: no reason to hurry the relay
        sure = punch_outlook(sit.our_behavior, sit.peer_behavior).sure
        if steps and one_symmetric and only_punches and not sure:
            delay = RELAY_STAGGER_LONG_SHOT
        steps.append(Step(Strategy.RELAY, delay, RELAY_BUDGET))
    return Plan(tuple(steps), tuple(skipped))
