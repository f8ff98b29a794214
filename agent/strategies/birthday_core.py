"""Birthday probing between a random-port symmetric NAT and a cone: who does what, how much, how often (sans-IO).

A symmetric NAT gives each new destination a new random public port, so the cone side cannot know
where the symmetric side's packets will come from, and a port-restricted cone lets in only ports it
has sent to. Tailscale describes the way through (and does not ship it): the symmetric side opens
many mappings toward the cone's one address (`sockets` of them, each a socket sending there), the
cone side sends to random ports of the symmetric side's address (`probes` of them, `rate` per second,
each port once). A probe that lands on one of the open mappings gets in (the symmetric side sent to
exactly that address), and its answer gets back (the cone has now sent to that port). The chance
that `probes` probes miss every one of `sockets` mappings among the NAT's `port_space` ports is
(1 - sockets/port_space) ** probes: with the defaults 256 and 2,000 over 64,512 ports, 0.04 %.

Both sides probe only a peer they admit, at most once per `per_peer_interval` per peer and never
more than `max_running` at a time, so nobody can make an agent spray packets at will (`Limiter`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from agent.wire.nat_behavior import BirthdayRole, birthday_role

__all__ = ["FIRST_PORT", "PORT_SPACE", "BirthdayRole", "Budget", "Limiter", "birthday_role", "probe_ports"]

FIRST_PORT = 1024
PORT_SPACE = 65536 - FIRST_PORT
"""Linux picks random NAT ports from 1024-65535 (nf_nat with fully-random), as most NATs do."""


@dataclass(frozen=True)
class Budget:
    sockets: int = 256
    """Mappings the symmetric side opens toward the cone (one UDP socket each)."""
    probes: int = 2000
    """Ports of the symmetric side the cone side tries, each once."""
    rate: float = 1000.0
    """Probes per second (2 s for the defaults)."""
    refresh: float = 1.0
    """Seconds between the symmetric side's sends from each socket (its NAT drops idle mappings)."""

    def __post_init__(self) -> None:
        """The messages name the config keys (agent.birthday_*) that set these."""
        if not 1 <= self.sockets <= 1024:
            raise ValueError(f"birthday_sockets must be within 1-1024, got {self.sockets}")
        if not 1 <= self.probes <= PORT_SPACE:
            raise ValueError(f"birthday_probes must be within 1-{PORT_SPACE}, got {self.probes}")
        if not (math.isfinite(self.rate) and 1 <= self.rate <= 100_000):
            raise ValueError(f"birthday_rate must be within 1-100000 per second, got {self.rate}")
        if not 0.1 <= self.refresh <= 30:
            raise ValueError(f"birthday refresh must be within 0.1-30 s, got {self.refresh}")

    @property
    def seconds(self) -> float:
        """How long the cone side probes."""
        return self.probes / self.rate

    @property
    def chance(self) -> float:
        """The chance that one of the probes meets one of the mappings (uniform random ports)."""
        return 1.0 - (1.0 - self.sockets / PORT_SPACE) ** self.probes

    def packets(self) -> int:
        """Datagrams both sides send at most: probes, plus each socket's sends for as long as they run."""
        return self.probes + self.sockets * (1 + math.ceil(self.seconds / self.refresh))

    def describe(self) -> str:
        return (
            f"{self.sockets} sockets x {self.probes} probes at {self.rate:g}/s: {self.seconds:g} s, "
            f"at most {self.packets()} datagrams, {self.chance:.2%} to meet"
        )


def probe_ports(count: int, rng: random.Random) -> list[int]:
    """`count` distinct random ports of the NAT's range, in random order (each tried once)."""
    return [FIRST_PORT + p for p in rng.sample(range(PORT_SPACE), min(count, PORT_SPACE))]


class Limiter:
    """At most one birthday attempt per peer per `per_peer_interval` seconds, `max_running` at once."""

    def __init__(self, per_peer_interval: float = 30.0, max_running: int = 1, max_peers: int = 4096) -> None:
        self.per_peer_interval = per_peer_interval
        self.max_running = max_running
        self.max_peers = max_peers
        self._last: dict[str, float] = {}
        self.running = 0
        self.refused = 0

    def start(self, peer: str, now: float) -> str:
        """"" and counted as running (call `done` after), or why not."""
        last = self._last.get(peer)
        if last is not None and now - last < self.per_peer_interval:
            self.refused += 1
            every = f"{self.per_peer_interval:g}"
            return f"birthday probing with {peer} ran {now - last:.0f} s ago (at most once per {every} s)"
        if self.running >= self.max_running:
            self.refused += 1
            return "another birthday probe is running"
        self._last[peer] = now
        while len(self._last) > self.max_peers:
            del self._last[next(iter(self._last))]
        self.running += 1
        return ""

    def done(self) -> None:
        self.running = max(0, self.running - 1)
