"""Which transport carries this agent's registration: UDP, or TCP when UDP does not get through (sans-IO).

RustDesk registers over UDP only, so an agent on a network that drops UDP (many corporate
networks) never registers and nobody can reach it. Here registration starts on UDP, as
upstream; when a registration has gone unanswered for `tcp_after` seconds the shell opens one
long-lived TCP connection to the server's main port and registers over it, and the server's
pushes come down that connection. That is detected, never configured.

While on TCP, a small UDP probe (a padded TestNatRequest, which changes nothing at the server)
goes out every `udp_probe_every` seconds; an answer means UDP works (again): registration moves
back to UDP (datagrams cost the server no connection) and the TCP connection is closed. A TCP
connection that fails or ends is reopened after a backoff that doubles up to `reconnect_max`;
registrations go out on UDP meanwhile (one may get through). A network change starts over on
UDP: the old verdict was about the old network.

The shell asks `due(now, unanswered_for)` on every tick and reports what happened; this class
never touches a socket or a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

UDP: Literal["udp"] = "udp"
TCP: Literal["tcp"] = "tcp"

TCP_AFTER = 3.0
"""Seconds a registration may go unanswered on UDP before TCP is tried: the registrar's first reply
timeout, so a single lost datagram on a working network costs at most a detour over TCP (the
next UDP probe brings registration back), while a UDP-blocked agent is reachable 3 s after start."""
UDP_PROBE_EVERY = 30.0
RECONNECT_MIN = 1.0
RECONNECT_MAX = 30.0


@dataclass(frozen=True, slots=True)
class OpenTcp:
    """Connect to the server's main port over TCP; report `tcp_connected` or `tcp_failed`."""


@dataclass(frozen=True, slots=True)
class CloseTcp:
    """UDP works: close the TCP connection (registration has moved back to UDP)."""


@dataclass(frozen=True, slots=True)
class ProbeUdp:
    """Send one UDP probe to the server; report `udp_answered` if anything valid comes back."""


Step = OpenTcp | CloseTcp | ProbeUdp
TcpState = Literal["down", "connecting", "up"]


class RegistrationPath:
    """The transport decision; times are seconds on any monotonic clock."""

    def __init__(
        self,
        *,
        tcp_after: float = TCP_AFTER,
        udp_probe_every: float = UDP_PROBE_EVERY,
        reconnect_min: float = RECONNECT_MIN,
        reconnect_max: float = RECONNECT_MAX,
    ) -> None:
        if tcp_after <= 0 or udp_probe_every <= 0 or not 0 < reconnect_min <= reconnect_max:
            raise ValueError("need tcp_after > 0, udp_probe_every > 0, 0 < reconnect_min <= reconnect_max")
        self.tcp_after = tcp_after
        self.udp_probe_every = udp_probe_every
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.want_tcp = False
        """UDP was found not to get through: keep a TCP connection."""
        self.tcp: TcpState = "down"
        self._backoff = reconnect_min
        self._next_connect = 0.0
        self._next_probe = 0.0
        self.tcp_connects = 0
        self.tcp_failures = 0
        self.moves_to_udp = 0
        self.reason = ""
        """Why registration is on TCP (one line), empty on UDP."""

    @property
    def transport(self) -> Literal["udp", "tcp"]:
        """Where registrations go now: TCP only while a connection is up and wanted."""
        return TCP if self.want_tcp and self.tcp == "up" else UDP

    def prefer_tcp(self, reason: str) -> None:
        """Start on TCP (`up`'s first round trip already found UDP blocked): no 3 s wait to learn it
        again; the UDP probe still brings registration back when UDP works."""
        self.want_tcp = True
        self.reason = reason

    def due(self, now: float, unanswered_for: float | None) -> list[Step]:
        """What to do at `now`; `unanswered_for`: how long the oldest unanswered registration has waited."""
        steps: list[Step] = []
        if not self.want_tcp and unanswered_for is not None and unanswered_for >= self.tcp_after:
            self.want_tcp = True
            self.reason = f"no answer over UDP in {unanswered_for:.0f} s"
        if self.want_tcp:  # (the probe schedule starts when the connection is up: tcp_connected)
            if self.tcp == "down" and now >= self._next_connect:
                self.tcp = "connecting"
                steps.append(OpenTcp())
            if self.tcp == "up" and now >= self._next_probe:
                self._next_probe = now + self.udp_probe_every
                steps.append(ProbeUdp())
        return steps

    def tcp_connected(self, now: float) -> bool:
        """The connection is up: True if registration moves onto it (the shell re-registers at once)."""
        if self.tcp != "connecting":
            return False
        self.tcp = "up"
        self.tcp_connects += 1
        self._backoff = self.reconnect_min
        self._next_probe = now + self.udp_probe_every
        return self.want_tcp

    def tcp_failed(self, now: float) -> bool:
        """The connect failed or the connection ended: True if registration was on it (re-register)."""
        was_on_it = self.transport == TCP
        self.tcp = "down"
        self.tcp_failures += 1
        self._next_connect = now + self._backoff
        self._backoff = min(self._backoff * 2, self.reconnect_max)
        return was_on_it

    def udp_answered(self, now: float) -> list[Step]:
        """A valid answer came over UDP: UDP works, registration goes back to it."""
        if not self.want_tcp:
            return []
        self.moves_to_udp += 1
        return self.reset()

    def reset(self) -> list[Step]:
        """A new network (or UDP answering again): UDP first, the TCP connection closed."""
        steps: list[Step] = [CloseTcp()] if self.tcp != "down" else []
        self.want_tcp = False
        self.reason = ""
        self.tcp = "down"
        self._backoff = self.reconnect_min
        self._next_connect = 0.0
        return steps

    def status(self) -> dict[str, object]:
        return {
            "transport": self.transport,
            "tcp": self.tcp,
            "why_tcp": self.reason,
            "tcp_connects": self.tcp_connects,
            "tcp_failures": self.tcp_failures,
            "back_to_udp": self.moves_to_udp,
        }
