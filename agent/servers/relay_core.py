"""The relay's decisions, sans-IO: first-frame checks, the pairing table, token buckets.

The asyncio shell (agent/servers/relay_server.py) owns the sockets and the clock; everything
here takes `now` as an argument so the rules can be proven with fake time in
milliseconds. The relay is a dumb uuid-keyed pipe (protocol notes 6.8): it checks
that the first frame is a RequestRelay with a usable uuid and a ticket from a
rendezvous server it trusts (agent/wire/signing.py; an `open` relay, like hbbr, skips that
for RustDesk clients), and the licence key when one is configured; then it pairs the
two connections that name the same uuid. A uuid that has paired once is spent until
its ticket expires, so a ticket cannot be used twice.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from agent.common.ip_caps import PerIpCap
from agent.proto import rendezvous_pb2 as pb
from agent.wire import messages, signing
from agent.wire.frames import FrameDecoder, encode_frame

FIRST_FRAME_MAX = 4096
"""Cap on the first frame: a real RequestRelay is ~100 bytes, so a bigger header is hostile."""

MAX_UUID_LEN = 64
"""In UTF-8 bytes: RustDesk sends a 36-char UUIDv4; anything much longer is not a peer of ours.
Counted in bytes, not characters, so every accepted uuid also fits the handoff message's
one-byte length (64 four-byte characters would not)."""

KEY_MISMATCH = "relay key mismatch"


# --------------------------------------------------------------------------- first frame


class FirstFrameReader:
    """Says exactly how many bytes to read next so that nothing past the first frame is consumed.

    Reading exactly the frame leaves any early payload the client sent behind it in the
    kernel's receive queue, where the pump picks it up after pairing: nothing is buffered
    in user space while a connection waits, and TCP flow control bounds what a waiting
    peer can push. The header is decoded here only to learn the sizes; FrameDecoder
    stays the authority on the payload and the size limit.
    """

    __slots__ = ("_decoder", "_header", "_in_body", "_want")

    def __init__(self, max_frame: int = FIRST_FRAME_MAX) -> None:
        self._decoder = FrameDecoder(max_frame)
        self._header = bytearray()
        self._in_body = False
        self._want = 1

    def want(self) -> int:
        """Bytes to read before the next `feed` can make progress (0 once the frame is out)."""
        return self._want

    def feed(self, data: bytes) -> bytes | None:
        """Feed at most `want()` bytes; returns the payload once the frame is complete.

        Raises FrameError (from the decoder) as soon as the header declares more than the limit.
        """
        if len(data) > self._want:
            raise ValueError(f"fed {len(data)} bytes, at most {self._want} wanted")
        if not data:
            return None
        frames = self._decoder.feed(data)
        if frames:
            self._want = 0
            return frames[0]
        if self._in_body:
            self._want -= len(data)
            return None
        self._header += data
        head_len = (self._header[0] & 3) + 1
        if len(self._header) < head_len:
            self._want = head_len - len(self._header)
            return None
        # Complete header, within the limit (the decoder raised otherwise), body not yet here.
        self._in_body = True
        self._want = int.from_bytes(self._header, "little") >> 2
        return None


@dataclass(frozen=True)
class Accept:
    uuid: str
    expires: float = 0.0
    """Unix time the ticket expires (0: no ticket, an open relay)."""


@dataclass(frozen=True)
class Refuse:
    """Answer `reply` (a complete frame) and close: the client learns why."""

    reason: str
    reply: bytes


@dataclass(frozen=True)
class Drop:
    """Close without a word and count `reason`."""

    reason: str


@dataclass(frozen=True)
class Health:
    """A HealthCheck as the first frame (the rendezvous server asking for our load): answer, close."""


Decision = Accept | Refuse | Drop | Health


def check_request(
    payload: bytes, key: str = "", *, server_keys: tuple[bytes, ...] = (), open_relay: bool = False, now: float = 0.0
) -> Decision:
    """Judge the first frame's payload; `now` is Unix time (tickets carry the server's clock)."""
    try:
        kind, sub = messages.parse(payload, max_len=FIRST_FRAME_MAX)
    except messages.MessageError as exc:
        return Drop(exc.reason)
    if kind == "hc":
        return Health()
    if kind != "request_relay":
        return Drop("unexpected_message")
    uuid: str = sub.uuid
    if not uuid:
        return Drop("empty_uuid")
    if len(uuid.encode()) > MAX_UUID_LEN:
        return Drop("uuid_too_long")
    if key and not hmac.compare_digest(sub.licence_key.encode(), key.encode()):
        reply = messages.build(relay_response=pb.RelayResponse(uuid=uuid, refuse_reason=KEY_MISMATCH))
        return Refuse("key_mismatch", encode_frame(reply))
    if open_relay:
        return Accept(uuid)
    try:
        ticket = signing.check_ticket(server_keys, bytes(sub.ticket), uuid, sub.relay_server, now)
    except signing.SignatureError as exc:
        reason = f"relay refused: {exc}"
        reply = messages.build(relay_response=pb.RelayResponse(uuid=uuid, refuse_reason=reason))
        return Refuse("no_ticket" if not sub.ticket else "bad_ticket", encode_frame(reply))
    return Accept(uuid, ticket.expires)


def owner_index(uuid: str, replicas: int) -> int:
    """Which of `replicas` co-located relay workers pairs this uuid.

    A stable hash (not Python's salted hash()) so every worker process agrees.
    """
    if replicas < 1:
        raise ValueError("replicas must be at least 1")
    digest = hashlib.blake2b(uuid.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % replicas


# --------------------------------------------------------------------------- handoff message


HANDOFF_MAX = 512


def encode_handoff(uuid: str, peer: str) -> bytes:
    """Control message that travels with a passed socket: which uuid it asked for, and who it is."""
    u = uuid.encode()
    p = peer.encode()[:255]
    if not u or len(u) > 255:
        raise ValueError("bad uuid for handoff")
    return bytes((1, len(u))) + u + bytes((len(p),)) + p


def decode_handoff(data: bytes) -> tuple[str, str]:
    """Inverse of encode_handoff; ValueError on anything else."""
    if len(data) < 3 or len(data) > HANDOFF_MAX or data[0] != 1:
        raise ValueError("not a handoff message")
    ulen = data[1]
    if ulen == 0 or 2 + ulen >= len(data):
        raise ValueError("truncated handoff message")
    uuid = data[2 : 2 + ulen].decode()
    plen = data[2 + ulen]
    if 3 + ulen + plen != len(data):
        raise ValueError("handoff message length mismatch")
    peer = data[3 + ulen :].decode(errors="replace")
    if len(uuid) > MAX_UUID_LEN:
        raise ValueError("uuid too long")
    return uuid, peer


# --------------------------------------------------------------------------- pairing table

C = TypeVar("C")


EVICTED_OLDEST_WAITER = "evicted_oldest_waiter"
"""The table was full: the waiter parked longest (from any IP) made room."""
EVICTED_WAITER_PER_IP = "evicted_waiter_per_ip"
"""The newcomer's IP already had its cap of waiters: that IP's oldest waiter made room."""


@dataclass(frozen=True)
class Wait(Generic[C]):
    """Parked until `deadline` for a partner; `evicted` is the waiter that made room, to be closed,
    and `evicted_reason` says which bound it made room under (one of the EVICTED_* names)."""

    deadline: float
    evicted: tuple[str, C] | None = None
    evicted_reason: str = field(default="", compare=False)


@dataclass(frozen=True)
class Paired(Generic[C]):
    partner: C


@dataclass(frozen=True)
class Refused:
    reason: str


class PairingTable(Generic[C]):
    """uuid -> the connection waiting for its partner; uuids of pairs in progress.

    Both maps are bounded: at most `max_waiting` parked connections (the oldest makes room), at most
    `max_active` pairs (0 = no limit beyond the process's descriptors). A third
    connection naming a uuid that is already paired is refused, so nobody can
    squat on, or tap into, a running pair. With `max_waiting_per_ip`, one source IP
    (the `source` given to `offer`) parks at most that many: its own oldest waiter
    makes room, so one host cannot fill the table and evict everyone else's.
    """

    def __init__(
        self, pair_wait: float = 30.0, max_waiting: int = 1024, max_active: int = 0, max_waiting_per_ip: int = 0
    ) -> None:
        if pair_wait <= 0 or max_waiting < 1 or max_active < 0 or max_waiting_per_ip < 0:
            raise ValueError("pair_wait > 0, max_waiting >= 1, max_active >= 0, max_waiting_per_ip >= 0")
        self.pair_wait = pair_wait
        self.max_waiting = max_waiting
        self.max_active = max_active
        self._waiting: OrderedDict[str, tuple[C, float]] = OrderedDict()
        self._active: set[str] = set()
        self._spent: OrderedDict[str, float] = OrderedDict()
        """uuids that paired and ended, until their ticket expires (oldest first, bounded)."""
        self.max_spent = 65536
        self.per_ip: PerIpCap[str] = PerIpCap(max_waiting_per_ip)
        """uuids of the waiters, by the source IP that parked them."""

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    def waiting_from(self, source: str) -> int:
        """Waiters parked by this source IP."""
        return self.per_ip.count(source)

    def offer(self, uuid: str, conn: C, now: float, source: str = "") -> Wait[C] | Paired[C] | Refused:
        """Pair `conn` with the waiter under `uuid`, or park it; `source` is its IP ("" = not counted per IP)."""
        if uuid in self._active:
            return Refused("uuid_in_use")
        while self._spent and next(iter(self._spent.values())) <= now:
            self._spent.popitem(last=False)
        if uuid in self._spent:
            return Refused("uuid_spent")
        parked = self._waiting.pop(uuid, None)
        if parked is not None:
            # Even a waiter past its deadline that expire() has not collected yet is still
            # connected: pairing it is better than refusing.
            self.per_ip.discard(uuid)
            self._active.add(uuid)
            return Paired(parked[0])
        if self.max_active and len(self._active) >= self.max_active:
            return Refused("pairs_full")
        evicted: tuple[str, C] | None = None
        reason = ""
        # No busy test here, so the cap always holds and one victim at most makes room.
        victims = self.per_ip.admit(source, uuid) if source else []
        if victims:
            old_conn, _ = self._waiting.pop(victims[0])
            evicted, reason = (victims[0], old_conn), EVICTED_WAITER_PER_IP
        if evicted is None and len(self._waiting) >= self.max_waiting:
            # Full: the waiter parked longest makes room. Refusing newcomers instead would let one
            # host that parks max_waiting never-paired requests lock every real pair out for
            # pair_wait; real halves arrive within moments of each other, so the oldest is the
            # least likely to still get its partner.
            old_uuid, (old_conn, _) = self._waiting.popitem(last=False)
            self.per_ip.discard(old_uuid)
            evicted, reason = (old_uuid, old_conn), EVICTED_OLDEST_WAITER
        deadline = now + self.pair_wait
        self._waiting[uuid] = (conn, deadline)
        return Wait(deadline, evicted, reason)

    def expire(self, now: float) -> list[tuple[str, C]]:
        """Remove and return every waiter whose deadline has passed."""
        out: list[tuple[str, C]] = []
        stale = [u for u, (_, d) in self._waiting.items() if d <= now]
        for uuid in stale:
            conn, _ = self._waiting.pop(uuid)
            self.per_ip.discard(uuid)
            out.append((uuid, conn))
        return out

    def next_deadline(self) -> float | None:
        if not self._waiting:
            return None
        return min(d for _, d in self._waiting.values())

    def cancel(self, uuid: str, conn: C) -> bool:
        """Forget a waiter (it hung up); False if `conn` is not the one waiting under `uuid`."""
        parked = self._waiting.get(uuid)
        if parked is None or parked[0] is not conn:
            return False
        del self._waiting[uuid]
        self.per_ip.discard(uuid)
        return True

    def release(self, uuid: str, spent_until: float | None = None) -> None:
        """A pair ended: its uuid may be used again, after `spent_until` (its ticket's end) if given."""
        self._active.discard(uuid)
        if spent_until is not None:
            self._spent.pop(uuid, None)
            self._spent[uuid] = spent_until
            while len(self._spent) > self.max_spent:
                self._spent.popitem(last=False)


# --------------------------------------------------------------------------- token buckets


class TokenBucket:
    """Classic token bucket in bytes; tokens never go negative, so a limit is never exceeded.

    Over any window of length T at most `burst + rate * T` bytes are granted.
    """

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, now: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(self.rate * 0.05, 16384.0)
        if self.burst < 1:
            raise ValueError("burst must be at least one byte")
        self._tokens = self.burst
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now

    def available(self, now: float) -> int:
        self._refill(now)
        return int(self._tokens)

    def take(self, n: int, now: float) -> None:
        """Reserve `n` bytes; the caller checked `available` in the same instant."""
        self._refill(now)
        if n > self._tokens + 1e-6:
            raise ValueError(f"taking {n} bytes with only {self._tokens:.0f} available")
        self._tokens = max(0.0, self._tokens - n)

    def refund(self, n: int, now: float) -> None:
        """Give back what was reserved but not moved (the read returned less)."""
        self._refill(now)
        self._tokens = min(self.burst, self._tokens + max(n, 0))

    def wait_time(self, need: int, now: float) -> float:
        """Seconds until `need` bytes (capped at the burst) are available."""
        self._refill(now)
        need_f = min(float(need), self.burst)
        if self._tokens >= need_f:
            return 0.0
        return (need_f - self._tokens) / self.rate


class Throttle:
    """All the buckets one stream must satisfy (its own, the server's); shared buckets are fine."""

    __slots__ = ("buckets", "throttled_s", "waits")

    def __init__(self, buckets: list[TokenBucket]) -> None:
        self.buckets = buckets
        self.waits = 0
        self.throttled_s = 0.0

    def take(self, want: int, now: float, quantum: int = 1) -> int:
        """Reserve and return how many of `want` bytes may be moved now (0 = wait).

        Grants smaller than `quantum` (capped at the smallest burst) are refused, so a
        throttled stream sleeps until a useful amount has accrued instead of spinning
        on a few bytes at a time. Reserve first, move, then refund the shortfall:
        between the two no other stream can spend the same tokens, so shared buckets
        stay exact.
        """
        g = want
        floor = min(want, quantum)
        for b in self.buckets:
            g = min(g, b.available(now))
            floor = min(floor, int(b.burst))
        if g <= 0 or g < floor:
            return 0
        for b in self.buckets:
            b.take(g, now)
        return g

    def refund(self, n: int, now: float) -> None:
        if n > 0:
            for b in self.buckets:
                b.refund(n, now)

    def wait_time(self, need: int, now: float) -> float:
        w = max((b.wait_time(need, now) for b in self.buckets), default=0.0)
        if w > 0:
            self.waits += 1
            self.throttled_s += w
        return w
