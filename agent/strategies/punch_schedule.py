"""RustDesk's UDP hole punch (protocol notes 6.11): the schedule (sans-IO) and an asyncio runner.

Both sides `connect()` their UDP socket to the peer's mapped address and send empty
datagrams: at once, then after 20 ms, 30 ms, 45 ms ... (x1.5, capped at 200 ms) until the
deadline (20 s). Each empty datagram opens (or refreshes) our NAT's mapping towards the
peer; the first one that gets through proves the path. The initiator (A, listen=False)
stops at the first datagram from the peer, whatever it holds, and goes on to
`KcpTransport.connect`; the responder (B, listen=True) stops at the first non-empty
datagram, which is A's KCP SYN, and hands it to `KcpTransport.accept` as `first_datagram`
so the handshake loses nothing. An empty one it answers at once (a few times at most, as
ICE's triggered checks): A's datagram got through, so ours sent now gets through too,
and A need not wait for our next scheduled send (20 ms or more) to start KCP.

Unlike RustDesk, an ICMP error (ECONNREFUSED on the connected socket) does not end the
punch: right after connect() the peer's NAT has often not opened yet, and the next
datagram may get through.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from agent.common.netutil import addr_infos

PUNCH_FIRST_INTERVAL = 0.02
PUNCH_GROWTH = 1.5
PUNCH_MAX_INTERVAL = 0.2
PUNCH_DEADLINE = 20.0
TRIGGERED_REPLIES = 8
"""Empty datagrams the responder answers at once (ICE's triggered checks), at most: a reply is never
larger than what came, and a peer that keeps sending gets no more than this beside the schedule."""

Address = tuple[str, int] | tuple[str, int, int, int]


@dataclass(frozen=True, slots=True)
class PunchSchedule:
    first_interval: float = PUNCH_FIRST_INTERVAL
    growth: float = PUNCH_GROWTH
    max_interval: float = PUNCH_MAX_INTERVAL
    deadline: float = PUNCH_DEADLINE
    """Seconds after the start at which the punch gives up."""

    def intervals(self) -> Iterator[float]:
        """Gaps between consecutive sends: 0.02, 0.03, 0.045, ... capped at max_interval, forever."""
        gap = self.first_interval
        while True:
            yield min(gap, self.max_interval)
            gap = min(gap * self.growth, self.max_interval)

    def send_times(self) -> list[float]:
        """Offsets (seconds from the start) of every empty datagram: 0, 0.02, 0.05, 0.095, ..."""
        times = [0.0]
        t = 0.0
        for gap in self.intervals():
            t += gap
            if t >= self.deadline:
                return times
            times.append(t)
        raise AssertionError("unreachable")  # pragma: no cover


class Puncher:
    """The punch as a state machine: `due(now)` says whether to send, `on_datagram` whether we are done."""

    def __init__(self, *, listen: bool, now: float, schedule: PunchSchedule | None = None) -> None:
        self.listen = listen
        self.schedule = schedule or PunchSchedule()
        self.started = now
        self.deadline = now + self.schedule.deadline
        self._gaps = self.schedule.intervals()
        self._next_send = now
        self.sent = 0
        self.ignored_empty = 0
        self.done = False
        self._replies_due = 0
        self._replied = 0
        self.first_datagram: bytes | None = None
        self.finished_at: float | None = None

    def due(self, now: float) -> bool:
        """True when one empty datagram should go out now (never a burst, however late we are)."""
        if self.done or now >= self.deadline or now < self._next_send:
            return False
        self.sent += 1
        gap = next(self._gaps)
        planned = self._next_send + gap
        self._next_send = planned if planned > now else now + gap
        return True

    def reply_now(self) -> bool:
        """True when an empty datagram should go back at once to where the last one came from: it
        got through, so an answer now meets the peer's open NAT a schedule gap sooner (the
        responder waits for A's KCP SYN, which A sends only once it hears from us)."""
        if not self._replies_due or self.done:
            return False
        self._replies_due -= 1
        self._replied += 1
        return True

    def next_timer(self) -> float:
        return min(self._next_send, self.deadline)

    def expired(self, now: float) -> bool:
        return not self.done and now >= self.deadline

    def on_datagram(self, data: bytes, now: float) -> bool:
        """Feed a datagram from the peer; True when the punch is complete."""
        if self.done:
            return True
        if self.listen and not data:
            self.ignored_empty += 1
            if self._replied + self._replies_due < TRIGGERED_REPLIES:
                self._replies_due += 1
            return False
        self.done = True
        self.finished_at = now
        self.first_datagram = bytes(data) if data else None
        return True


@dataclass(frozen=True, slots=True)
class PunchResult:
    peer_addr: Address
    first_datagram: bytes | None
    """Responder: A's KCP SYN, to pass to `KcpTransport.accept(first_datagram=...)`."""
    sent: int
    elapsed: float


class PunchTimeout(TimeoutError):
    """Nothing usable came from the peer before the deadline."""


def _same_endpoint(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    """Compare socket addresses across forms ('::ffff:1.2.3.4' vs '1.2.3.4', 4-tuples vs 2-tuples)."""
    if a[1] != b[1]:
        return False
    try:
        ia = ipaddress.ip_address(str(a[0]).split("%")[0])
        ib = ipaddress.ip_address(str(b[0]).split("%")[0])
    except ValueError:
        return a[0] == b[0]
    if isinstance(ia, ipaddress.IPv6Address) and ia.ipv4_mapped is not None:
        ia = ia.ipv4_mapped
    if isinstance(ib, ipaddress.IPv6Address) and ib.ipv4_mapped is not None:
        ib = ib.ipv4_mapped
    return ia == ib


async def punch(
    sock: socket.socket,
    peer_addr: Address,
    *,
    listen: bool,
    schedule: PunchSchedule | None = None,
    peer_reflexive: bool = False,
    also: tuple[Address, ...] = (),
) -> PunchResult:
    """Punch towards `peer_addr` from `sock` and return what came back; the socket ends up
    connected to the peer's address.

    With `peer_reflexive`, a datagram from the peer's IP but another port is taken too,
    and the socket is connected to where it came from: a symmetric NAT maps the peer's
    socket to a new port for us, and a full cone on our side lets that port in (RustDesk
    gives up when either side is symmetric). Otherwise datagrams from any other source are
    ignored. `also` (with `peer_reflexive`): more of the peer's addresses to punch each round, the
    ports its sequential NAT will give it next (agent/wire/nat_behavior.py predicted_ports): the peer's
    packets come from one of them, and our NAT lets them in only once we have sent there. Raises
    PunchTimeout after `schedule.deadline` seconds.
    """
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    if peer_reflexive:
        family = sock.family
        infos = await addr_infos(peer_addr[0], peer_addr[1], socket.SOCK_DGRAM, family)
        peer: Address = (str(infos[0][1][0]), int(infos[0][1][1]))
    else:
        sock.connect(peer_addr)
        peer = sock.getpeername()
    puncher = Puncher(listen=listen, now=loop.time(), schedule=schedule)
    while True:
        now = loop.time()
        if puncher.due(now):
            with contextlib.suppress(OSError):  # ECONNREFUSED from an ICMP error, ENOBUFS: try again later
                if peer_reflexive:
                    sock.sendto(b"", peer)
                    for extra in also:
                        sock.sendto(b"", extra)
                else:
                    sock.send(b"")
        if puncher.expired(now):
            raise PunchTimeout(
                f"UDP punch to {peer[0]}:{peer[1]} timed out after {puncher.schedule.deadline:g} s "
                f"({puncher.sent} datagrams sent, {puncher.ignored_empty} empty ones received)"
            )
        wait = max(puncher.next_timer() - now, 0.0)
        try:
            async with asyncio.timeout(wait):
                data, addr = await loop.sock_recvfrom(sock, 65536)
        except TimeoutError:
            continue
        except ConnectionRefusedError:
            continue
        same_ip = _same_endpoint((addr[0], 0), (peer[0], 0))
        if not (_same_endpoint(addr, peer) or (peer_reflexive and same_ip)):
            continue
        if not puncher.on_datagram(data, loop.time()):
            if puncher.reply_now():
                with contextlib.suppress(OSError):
                    if peer_reflexive:
                        sock.sendto(b"", addr)
                    else:
                        sock.send(b"")
            continue
        if peer_reflexive:
            sock.connect(addr[:2])
            peer = sock.getpeername()
        return PunchResult(
            peer_addr=peer,
            first_datagram=puncher.first_datagram,
            sent=puncher.sent,
            elapsed=loop.time() - puncher.started,
        )
