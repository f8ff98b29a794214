"""The rendezvous server's decisions (the hbbs role), sans-IO.

Input is a datagram or a TCP frame payload with its observed source address and
the current time; output is a list of actions (send this datagram, send this frame
on that connection, close it, make this row durable). No sockets, no clocks: the
asyncio shell in `rendezvous_server.py` owns those, and tests drive this class
directly with a fake `now`.

Where we differ from upstream hbbs, and why:

* Never answer a UDP source with more bytes than it sent (UDP sources can be spoofed,
  so a bigger answer would make us an amplifier). A reply that would be larger is
  dropped and counted; a client that needs it pads its request (TestNatRequest.padding).
* Loopback has no admin powers; ConfigUpdate over UDP is ignored.
* An empty PunchHoleRequest.licence_key is accepted (the server still signs B's key, so
  a client with no key configured can connect and verify the key later; a client that
  names a different key gets LICENSE_MISMATCH).
* Relay decision: A's explicit force_relay or --always-relay wins over the same-LAN
  path (the user or operator asked for the relay); then same public IP -> LAN; then
  both peers SYMMETRIC -> relay, unless A offers an IPv6 address (socket_addr_v6): v6 needs
  no NAT traversal, so B gets the PunchHole and both try v6; else punch. The relay push is a RequestRelay to B
  carrying a fresh uuid, so A's reply is a RelayResponse without an extra round trip.
* Registration also works over TCP (RegisterPk and RegisterPeer frames on one long-lived connection
  on the main port), for agents whose UDP is blocked: pushes then go down that connection, and its
  end takes the peer offline at once. Upstream answers a TCP RegisterPk with NOT_SUPPORT.
* An accepted RegisterPk refreshes B's address at once (upstream waits for the next
  RegisterPeer, so a peer is "offline" for up to 15 s after a server restart).
* Answers from B are matched to A's pending request by A's address *and* the target
  ID; a UDP PunchHoleSent is only accepted for a request that carried a udp_port.
* A's RequestRelay for an unknown or offline ID gets RelayResponse{refuse_reason} at
  once instead of silence (A fails fast instead of after 18 s).
* Pushes to one peer are rate limited (a token bucket per ID) so TCP requests cannot
  turn the server into a datagram cannon aimed at a registered address.
* The per-IP distinct-ID window is a fixed day from the first ID (upstream restarts
  the day on every registration, so a steady trickle never resets it).
* A peer that registered over loopback (an agent using the server embedded on its own
  host) is handed to a requester from elsewhere at the address that requester reached
  the server at, not at 127.0.0.1: its punch sockets listen on every address of the host.

Trust (issue 9; the signatures are described in agent/wire/signing.py):

* Registration proves possession of the key. An agent's RegisterPk first gets a
  challenge (bound to its ID, its address and the time, so it cannot be replayed from
  elsewhere), then comes again signed by the key, and the ID must be derived from that
  key (agent/identity.py derive_id). The first signed registration binds ID <-> key for
  good; later ones may change the uuid or the address only with the same key's signature.
  The uuid is no secret any more. RustDesk's unsigned registrations are refused unless
  `allow_unsigned` (an explicit server flag), and they can never displace or change a
  signed binding.
* RegisterPeer (the unsigned heartbeat) only keeps a signed binding alive from the exact
  address it was registered from; from anywhere else it gets request_pk.
* Requests (PunchHoleRequest, RequestRelay) name and sign for their requester
  (requester_id, by the key bound to it, with a time and a nonce); a requester whose ID
  is bound to no key yet (it could not register: UDP blocked) is taken on its key
  and the proof that its ID is derived from it, as a registration would be. Pushes
  tell B who asks and with which key (requester_id, requester_pk) and are signed by
  the server, so B can decide whether to act at all and admits the peer only with that key.
* Answers are taken only from the party the push went to: each push carries a random
  answer_token that B echoes (an unsigned RustDesk B: the answer must come from its IP).
  A always gets B's key from the registry, signed, never a key from the answer.
* Nobody but the server picks a relay: a client's relay_server is ignored, and every
  relay pair gets a ticket the relay checks (agent/wire/signing.py make_ticket).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import secrets
import uuid as uuid_mod
from array import array
from bisect import bisect_left
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from nacl.signing import SigningKey

from agent.common.stats import DropStats
from agent.proto import rendezvous_pb2 as pb
from agent.servers.registry import PeerRow
from agent.wire import addr as addrmod
from agent.wire import messages, signing
from agent.wire.addr import IPAddress, SockAddr, to_v4_if_mapped
from agent.wire.keys import public_key_b64, sign_id_pk
from agent.wire.nat_behavior import UNMEASURED, NatBehavior, birthday_role, punch_outlook, tcp_outlook
from agent.wire.peer_ids import derive_id

log = logging.getLogger("punchthrough.rendezvous")

ID_RE = re.compile(r"[A-Za-z0-9_-]{6,64}")
MAX_UUID = 256
"""RegisterPk.uuid is a machine-uid string; anything longer is not one."""
MAX_PK = 64
MAX_RELAY_UUID = 128
MAX_RELAY_SERVER = 255
V6_MANGLED_LEN = 18
MAX_TCP_MESSAGE = 64 * 1024
NONCE_BYTES = 16
CHALLENGE_BYTES = 16
CHALLENGE_EPOCH = 30.0
"""Seconds a challenge is issued for; one from the epoch before is still taken (so 30-60 s)."""
REQUEST_WINDOW = 600.0
"""A signed request's time may be this many seconds off the server's clock (clocks drift; a
replay inside the window is caught by its nonce)."""
MAX_REFUSE_REASON = 200

Role = Literal["main", "nat"]
"""Which TCP listener a connection came in on: the main port or the NAT-test port (port-1)."""


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class SendUdp:
    addr: SockAddr
    payload: bytes
    via: int
    """Index of the local UDP endpoint to send from (the one the peer registered through)."""
    other_port: bool = False
    """Send from the same address's other UDP port (main <-> NAT test): the NAT probe's filtering test."""


@dataclass(frozen=True, slots=True)
class SendTcp:
    conn: int
    payload: bytes
    """One serialized RendezvousMessage; the shell frames it."""


@dataclass(frozen=True, slots=True)
class CloseTcp:
    conn: int


@dataclass(frozen=True, slots=True)
class Persist:
    """Make this binding durable. Actions after it in the same list must wait until it is."""

    row: PeerRow


Action = SendUdp | SendTcp | CloseTcp | Persist


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a registration came from, and so how its answer goes back: a datagram on UDP endpoint
    `via` (never larger than the `size` bytes received), or a frame on TCP connection `conn` (> 0)."""

    src: SockAddr
    via: int = 0
    size: int = 0
    conn: int = 0

    @property
    def transport(self) -> str:
        return "tcp" if self.conn else "udp"


class PeerLookup(Protocol):
    """Read side of the registry (agent.servers.registry.Registry fits)."""

    def get(self, peer_id: str) -> PeerRow | None: ...


# --------------------------------------------------------------------------- state


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Timers and caps; defaults are upstream's numbers where upstream has one."""

    reg_timeout: float = 30.0  # online = last registration younger than this
    pending_ttl: float = 30.0  # A's parked request waits this long for B's answer
    max_pending: int = 4096
    max_peers: int = 1_000_000  # in-memory peer cache (the DB holds the rest)
    max_ip_states: int = 4096  # per-IP RegisterPk limiter entries
    ip_block_window: float = 60.0
    ip_block_limit: int = 30  # RegisterPk per IP without a 60 s pause
    ip_ids_window: float = 86400.0
    ip_ids_limit: int = 300  # distinct IDs per IP per window
    id_pk_window: float = 6.0
    id_pk_limit: int = 3  # the 4th RegisterPk for one ID inside the window is refused
    push_burst: float = 64.0  # pushes (PunchHole/FetchLocalAddr/RequestRelay) to one peer
    push_rate: float = 32.0  # ... refilled per second. Each new session costs B one to three pushes
    # (punch, relay, retries): 50 sessions opened at once (issue 5's load) must fit in a connect
    # timeout, while a flood still reaches B as at most ~3 KB/s of small datagrams.
    log_interval: float = 10.0
    max_log_sources: int = 4096
    max_nonce_ids: int = 65536  # requesters whose recent request nonces are remembered
    max_nonces_per_id: int = 4096  # ... each: more than this in REQUEST_WINDOW * 2 forgets the oldest


RELAY_MISSES = 2
"""Health checks a relay may miss in a row before it is no longer handed out."""
RELAY_REFUSED = -1
"""A health check's result when the relay's host refused the connection: no relay listens there
(its process or node died), which is no lost packet, so the relay is down at once."""


@dataclass(slots=True)
class RelayState:
    up: bool = True
    load: int = 0
    """Pairs active and waiting at the last check, plus the pairs handed out since."""
    misses: int = 0


@dataclass(slots=True)
class Peer:
    id: str
    uuid: bytes
    pk: bytes
    last_ip: str
    addr: SockAddr | None = None
    via: int = 0
    tcp_conn: int = 0
    """> 0: registered over this TCP connection (its UDP does not get through): pushes go there."""
    last_reg: float = -math.inf
    nat_type: int = pb.UNKNOWN_NAT
    behavior: NatBehavior = UNMEASURED
    """What its NAT does with UDP, from its RegisterPeer (agent/wire/nat_behavior.py)."""
    pk_count: int = 0
    pk_time: float = -math.inf
    push_tokens: float = -1.0  # < 0: full bucket on first use
    push_time: float = 0.0
    signed: bool = False
    """Bound by a signed registration: only that key may ever change it."""


@dataclass(slots=True)
class _IpState:
    count: int
    last: float
    ids_since: float
    ids: array[int] = field(default_factory=lambda: array("Q"))
    """Sorted hashes of the IDs seen in the window: 8 bytes each, so 300 IDs cost 2.4 KB per IP."""


@dataclass(slots=True)
class Pending:
    """A's parked request: which connection to answer and what it asked for."""

    conn: int
    target: str
    created: float
    udp_port: int = 0
    relay_server: str = ""
    uuid: str = ""
    ticket: bytes = b""
    token: bytes = b""
    """B's answer must echo this (it went to B only, inside the push)."""
    answer_ip: str = ""
    """Where the push went: an unsigned (RustDesk) B, which echoes no token, must answer from there."""
    birthday: bool = False
    """B was asked to meet A by birthday probing: A's answer says so, and A takes its part."""
    host_alias: IPAddress | None = None
    """B shares the server's host and speaks to it over loopback: A reached the server, so B, at this
    address (B's answers from 127.0.0.1 are rewritten to it, port kept)."""


@dataclass(frozen=True, slots=True)
class Requester:
    """Who signed a request, and the key bound to that ID."""

    id: str
    pk: bytes


def valid_id(peer_id: str) -> bool:
    return ID_RE.fullmatch(peer_id) is not None


def _clean(text: str, limit: int) -> str:
    """Peer-supplied text passed on to another peer: printable and bounded."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _seen_by_a(b: SockAddr, p: Pending) -> SockAddr:
    """B's address as A can reach it: B's loopback address is the server's host, as A knows it."""
    if p.host_alias is not None and b.ip.is_loopback:
        return SockAddr(p.host_alias, b.port)
    return b


def _v6(data: bytes) -> bytes:
    """Copy an IPv6 AddrMangle field only when it has the one valid length."""
    return data if len(data) == V6_MANGLED_LEN else b""


class RendezvousCore:
    """All of hbbs' state and decisions. Call from one thread (the event loop)."""

    def __init__(
        self,
        store: PeerLookup,
        signing_key: SigningKey,
        *,
        relays: Sequence[str] = (),
        always_relay: bool = False,
        limits: Limits | None = None,
        new_uuid: Callable[[], str] = lambda: str(uuid_mod.uuid4()),
        allow_unsigned: bool = False,
        secret: bytes | None = None,
        new_token: Callable[[], bytes] = lambda: secrets.token_bytes(16),
        wall_offset: float = 0.0,
    ) -> None:
        self.store = store
        self.key = signing_key
        self.public_key_b64 = public_key_b64(signing_key)
        self.relays = list(relays)
        self.relay_state: dict[str, RelayState] = {}
        self.always_relay = always_relay
        self.limits = limits or Limits()
        self.new_uuid = new_uuid
        self.allow_unsigned = allow_unsigned
        self.secret = secret if secret is not None else secrets.token_bytes(32)
        """Keys the registration challenges (a restart just issues new ones)."""
        self.new_token = new_token
        self.wall_offset = wall_offset
        """Unix time minus `now` (the shell keeps it current): request times and tickets are Unix time."""
        self.public_key = bytes(signing_key.verify_key)
        self.peers: OrderedDict[str, Peer] = OrderedDict()
        self._nonces: OrderedDict[str, OrderedDict[bytes, float]] = OrderedDict()
        self.pending: OrderedDict[SockAddr, Pending] = OrderedDict()
        self._conn_pending: dict[int, SockAddr] = {}
        self._conn_peers: dict[int, str] = {}
        """TCP connection -> the peer registered over it."""
        self.ip_states: OrderedDict[str, _IpState] = OrderedDict()
        self.drops = DropStats(self.limits.log_interval, self.limits.max_log_sources)
        self.messages: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self._relay_index = 0

    # ------------------------------------------------------------------ plumbing

    def drop(self, reason: str, source: SockAddr | str, now: float, detail: str = "") -> list[Action]:
        """Count a dropped input; log it at most once per source IP per interval."""
        host = source.host if isinstance(source, SockAddr) else source
        if self.drops.drop(reason, host, now):
            log.info("dropped input from %s: %s%s", source, reason, f" ({detail})" if detail else "")
        return []

    def _reply_udp(self, o: Origin, payload: bytes, now: float, other_port: bool = False) -> list[Action]:
        """The amplification rule: an answer to a UDP source is never larger than its request (a TCP
        source has shown it receives at its address: no rule). `other_port`: from the same address's
        other UDP port (the NAT probe's filtering test), still to the same source."""
        if o.conn:
            return [SendTcp(o.conn, payload)]
        if len(payload) > o.size:
            return self.drop("reply_larger_than_request", o.src, now, f"{len(payload)} > {o.size} bytes")
        return [SendUdp(o.src, payload, o.via, other_port)]

    @staticmethod
    def _mangle(a: SockAddr, now: float) -> bytes:
        return addrmod.encode(a, int(now * 1_000_000))

    @staticmethod
    def _demangle(data: bytes) -> SockAddr:
        return to_v4_if_mapped(addrmod.decode(data))

    def next_relay(self) -> str:
        """The relay for a new pair: the least loaded of those that answered their last health check
        (all of them while none has been checked, or when none answers: better a try than nothing),
        round robin among equals. Each hand-out counts as one more pair until the next check, so a
        burst of requests between two checks spreads too."""
        if not self.relays:
            return ""
        live = [r for r in self.relays if self.relay_state.get(r, RelayState()).up] or self.relays
        n = len(self.relays)
        order = [self.relays[(self._relay_index + i) % n] for i in range(n)]
        relay = min((r for r in order if r in live), key=lambda r: self.relay_state.get(r, RelayState()).load)
        self._relay_index = (self.relays.index(relay) + 1) % n
        state = self.relay_state.setdefault(relay, RelayState())
        state.load += 1
        return relay

    def relay_checked(self, relay: str, load: int | None) -> None:
        """A health check's result: the relay's pairs (active + waiting), None when it did not
        answer in time, RELAY_REFUSED when nothing listens there. Two misses in a row, or one
        refusal, take it out of the choice until it answers again."""
        state = self.relay_state.setdefault(relay, RelayState())
        if load is None or load == RELAY_REFUSED:
            state.misses = RELAY_MISSES if load == RELAY_REFUSED else state.misses + 1
            if state.misses >= RELAY_MISSES and state.up:
                state.up = False
                self.events["relay_down"] += 1
                log.warning("relay %s does not answer its health checks: not handed out", relay)
            return
        if not state.up:
            self.events["relay_up"] += 1
            log.info("relay %s answers again", relay)
        state.up, state.misses, state.load = True, 0, load

    def is_online(self, peer: Peer, now: float) -> bool:
        return peer.addr is not None and now - peer.last_reg < self.limits.reg_timeout

    def _remember(self, peer: Peer) -> None:
        self.peers[peer.id] = peer
        self.peers.move_to_end(peer.id)
        while len(self.peers) > self.limits.max_peers:
            self.peers.popitem(last=False)
            self.events["peer_evicted"] += 1

    def lookup(self, peer_id: str) -> Peer | None:
        """Memory first, then the database (a DB-only peer is loaded, offline)."""
        peer = self.peers.get(peer_id)
        if peer is not None:
            self.peers.move_to_end(peer_id)
            return peer
        row = self.store.get(peer_id)
        if row is None:
            return None
        peer = Peer(row.id, row.uuid, row.pk, row.last_ip, signed=row.signed)
        self._remember(peer)
        return peer

    def signed_pk(self, peer_id: str) -> bytes:
        """hbbs' signature over IdPk{id, pk}; empty when the ID is unknown."""
        peer = self.lookup(peer_id) if valid_id(peer_id) else None
        if peer is None or not peer.pk:
            return b""
        return sign_id_pk(self.key, peer.id, peer.pk)

    def _take_push_token(self, peer: Peer, now: float) -> bool:
        lim = self.limits
        if peer.push_tokens < 0:
            peer.push_tokens = lim.push_burst
        else:
            peer.push_tokens = min(lim.push_burst, peer.push_tokens + (now - peer.push_time) * lim.push_rate)
        peer.push_time = now
        if peer.push_tokens < 1.0:
            return False
        peer.push_tokens -= 1.0
        return True

    # ------------------------------------------------------------------ pending requests

    def _park(self, conn: int, a: SockAddr, pending: Pending) -> None:
        old = self.pending.pop(a, None)
        if old is not None and self._conn_pending.get(old.conn) == a:
            del self._conn_pending[old.conn]
        prev_key = self._conn_pending.get(conn)
        if prev_key is not None and prev_key != a:
            self.pending.pop(prev_key, None)
        self.pending[a] = pending
        self._conn_pending[conn] = a
        while len(self.pending) > self.limits.max_pending:
            _key, evicted = self.pending.popitem(last=False)
            self._conn_pending.pop(evicted.conn, None)
            self.events["pending_evicted"] += 1

    def _take(self, a: SockAddr, answer_id: str | None, token: bytes, src: SockAddr, now: float) -> Pending | None:
        """Remove and return A's pending request that this answer belongs to, if it comes from the
        party the push went to: it echoes the push's answer_token (an unsigned RustDesk B, which
        cannot, must answer from the address the push went to)."""
        p = self.pending.get(a)
        if p is None or now - p.created >= self.limits.pending_ttl:
            if p is not None:
                self._unpark(a)
            self.drop("no_pending_request", src, now, f"for {a}")
            return None
        if answer_id is not None and answer_id != p.target:
            self.drop("pending_id_mismatch", src, now, f"{answer_id!r} answered a request for {p.target!r}")
            return None
        if p.token:
            if not hmac.compare_digest(token, p.token):
                self.drop("answer_token_mismatch", src, now, f"an answer for {p.target} without its push's token")
                return None
        elif src.host != p.answer_ip:
            self.drop("answer_from_wrong_address", src, now, f"{p.target} was pushed at {p.answer_ip}")
            return None
        self._unpark(a)
        return p

    def _unpark(self, a: SockAddr) -> None:
        p = self.pending.pop(a, None)
        if p is not None and self._conn_pending.get(p.conn) == a:
            del self._conn_pending[p.conn]

    def tcp_closed(self, conn: int) -> None:
        """A's connection went away: nobody is left to answer. A peer registered over it is offline
        now (not after reg_timeout): no push could reach it."""
        peer_id = self._conn_peers.pop(conn, None)
        peer = self.peers.get(peer_id) if peer_id is not None else None
        if peer is not None and peer.tcp_conn == conn:
            peer.tcp_conn = 0
            peer.addr = None
            self.events["tcp_registration_closed"] += 1
        a = self._conn_pending.pop(conn, None)
        if a is not None:
            p = self.pending.get(a)
            if p is not None and p.conn == conn:
                del self.pending[a]

    def tick(self, now: float) -> None:
        """Expire parked requests (oldest first; the table is in creation order)."""
        ttl = self.limits.pending_ttl
        while self.pending:
            a, p = next(iter(self.pending.items()))
            if now - p.created < ttl:
                break
            self._unpark(a)
            self.events["pending_expired"] += 1

    # ------------------------------------------------------------------ UDP

    def handle_udp(self, data: bytes, src: SockAddr, via: int, now: float, role: Role = "main") -> list[Action]:
        """`role`: the main port, or the NAT-test port (port-1), which only answers TestNatRequest."""
        src = to_v4_if_mapped(src)
        try:
            kind, msg = messages.parse(data)
        except messages.MessageError as exc:
            return self.drop(exc.reason, src, now, "udp")
        self.messages[f"udp.{kind}" if role == "main" else f"udp.nat.{kind}"] += 1
        o = Origin(src, via, len(data))
        if role != "main" and kind != "test_nat_request":
            return self.drop("wrong_kind", src, now, f"udp nat-port {kind}")
        if kind == "register_peer":
            return self._register_peer(msg, o, now)
        if kind == "register_pk":
            return self._register_pk(msg, data, o, now)
        if kind == "test_nat_request":
            reply = messages.build(test_nat_response=pb.TestNatResponse(port=src.port, observed_ip=str(src.ip)))
            if len(reply) > len(data):  # an unpadded (RustDesk) request still gets its port
                reply = messages.build(test_nat_response=pb.TestNatResponse(port=src.port))
            return self._reply_udp(o, reply, now, other_port=msg.answer_from_other_port)
        if kind == "punch_hole_sent":
            return self._hole_sent_udp(msg, src, now)
        return self.drop("wrong_kind", src, now, f"udp {kind}")

    def _register_peer(self, rp: Any, o: Origin, now: float) -> list[Action]:
        src = o.src
        if not valid_id(rp.id):
            return self.drop("invalid_id", src, now, "register_peer")
        peer = self.peers.get(rp.id)  # memory only, as upstream: unknown -> ask for RegisterPk
        if peer is None or not peer.pk:
            request_pk = True
        else:
            self.peers.move_to_end(rp.id)
            if peer.signed:
                # An unsigned heartbeat keeps a signed binding alive only from the very address (and
                # TCP connection) its key registered: anything else (a new port, a new network, a
                # stranger) must sign.
                request_pk = peer.addr != src or peer.tcp_conn != o.conn
            elif peer.addr is not None:
                request_pk = peer.addr.ip != src.ip
            else:
                request_pk = bool(peer.last_ip) and peer.last_ip != src.host
            if not request_pk:
                self._route(peer, o, now)
                peer.nat_type = rp.nat_type
                peer.behavior = NatBehavior.from_pb(rp.nat_behavior)
        reply = messages.build(register_peer_response=pb.RegisterPeerResponse(request_pk=request_pk))
        return self._reply_udp(o, reply, now)

    def _route(self, peer: Peer, o: Origin, now: float) -> None:
        """Pushes to `peer` go back the way this registration came (its address, or its TCP connection)."""
        if peer.tcp_conn and peer.tcp_conn != o.conn and self._conn_peers.get(peer.tcp_conn) == peer.id:
            del self._conn_peers[peer.tcp_conn]
        peer.addr = o.src
        peer.via = o.via
        peer.tcp_conn = o.conn
        peer.last_reg = now
        if o.conn:
            self._conn_peers[o.conn] = peer.id

    def _pk_result(self, o: Origin, result: int, now: float) -> list[Action]:
        """An unsigned answer (to RustDesk's unsigned registrations)."""
        reply = messages.build(register_pk_response=pb.RegisterPkResponse(result=result))  # type: ignore[arg-type]
        return self._reply_udp(o, reply, now)

    def _signed_result(self, rk: Any, o: Origin, result: int, now: float, challenge: bytes = b"") -> list[Action]:
        """An answer to a signed-registration attempt, signed for the agent's nonce: the agent learns
        (and checks) our key from it, and a stale or forged answer cannot pass for this one."""
        resp = pb.RegisterPkResponse(result=result, challenge=challenge)  # type: ignore[arg-type]
        if challenge:
            resp.server_key = self.public_key
        body = messages.build(register_pk_response=resp)
        reply = signing.seal(self.key, signing.SERVER, bytes(rk.nonce), body)
        return self._reply_udp(o, reply, now)

    def _challenge(self, peer_id: str, o: Origin, epoch: int) -> bytes:
        where = f"{o.transport}:{o.src}".encode()
        msg = b"challenge\0" + peer_id.encode() + b"\0" + where + epoch.to_bytes(8, "big", signed=True)
        return hmac.new(self.secret, msg, hashlib.sha256).digest()[:CHALLENGE_BYTES]

    def _challenge_ok(self, challenge: bytes, peer_id: str, o: Origin, now: float) -> bool:
        epoch = int(now // CHALLENGE_EPOCH)
        return any(hmac.compare_digest(challenge, self._challenge(peer_id, o, e)) for e in (epoch, epoch - 1))

    def ip_allows(self, ip: str, peer_id: str, now: float) -> bool:
        """Upstream's check_ip_blocker: registrations per IP without a pause, distinct IDs per day."""
        lim = self.limits
        st = self.ip_states.get(ip)
        if st is None:
            st = _IpState(count=0, last=now, ids_since=now)
            self.ip_states[ip] = st
            while len(self.ip_states) > lim.max_ip_states:
                self.ip_states.popitem(last=False)
        else:
            self.ip_states.move_to_end(ip)
        if now - st.last > lim.ip_block_window:
            st.count = 0
        elif st.count >= lim.ip_block_limit:
            return False
        st.count += 1
        st.last = now
        if now - st.ids_since > lim.ip_ids_window:
            st.ids = array("Q")
            st.ids_since = now
        h = hash(peer_id) & 0xFFFF_FFFF_FFFF_FFFF
        ids = st.ids
        pos = bisect_left(ids, h)  # kept sorted: O(log n) lookups even with a raised limit
        if pos == len(ids) or ids[pos] != h:
            if len(ids) >= lim.ip_ids_limit:
                return False
            ids.insert(pos, h)
        return True

    def _id_pk_allows(self, peer: Peer, now: float) -> bool:
        """Upstream's per-ID limit: the 4th accepted RegisterPk for one ID inside the window is refused."""
        if now - peer.pk_time > self.limits.id_pk_window:
            peer.pk_count = 0
        elif peer.pk_count >= self.limits.id_pk_limit:
            self.events["register_pk_id_too_frequent"] += 1
            return False
        return True

    def _register_pk(self, rk: Any, data: bytes, o: Origin, now: float) -> list[Action]:
        R = pb.RegisterPkResponse
        src = o.src
        if not rk.uuid or not rk.pk:
            return self.drop("missing_uuid_or_pk", src, now)
        if len(rk.uuid) > MAX_UUID or len(rk.pk) > MAX_PK:
            return self.drop("field_too_long", src, now, "register_pk")
        if not rk.nonce:  # RustDesk's registration: the uuid is the only proof
            if not self.allow_unsigned:
                self.events["register_pk_unsigned_refused"] += 1
                return self._pk_result(o, R.NOT_SUPPORT, now)
            return self._register_unsigned(rk, o, now)
        if len(rk.nonce) != NONCE_BYTES or len(rk.pk) != signing.KEY_BYTES:
            return self.drop("bad_registration_fields", src, now)
        if not valid_id(rk.id):
            return self._signed_result(rk, o, R.INVALID_ID_FORMAT, now)
        if not rk.challenge or not self._challenge_ok(bytes(rk.challenge), rk.id, o, now):
            self.events["register_pk_challenged"] += 1
            challenge = self._challenge(rk.id, o, int(now // CHALLENGE_EPOCH))
            return self._signed_result(rk, o, R.CHALLENGE, now, challenge)
        body, sig = signing.split(data)
        if not signing.verify(bytes(rk.pk), signing.REGISTER, b"", body, sig):
            self.events["register_pk_bad_signature"] += 1
            return self._signed_result(rk, o, R.BAD_SIGNATURE, now)
        if derive_id(bytes(rk.pk), rk.id_salt) != rk.id:
            self.events["register_pk_id_not_derived"] += 1
            return self._signed_result(rk, o, R.ID_NOT_DERIVED, now)
        ip = src.host
        if not self.ip_allows(ip, rk.id, now):
            self.events["register_pk_ip_blocked"] += 1
            return self._signed_result(rk, o, R.TOO_FREQUENT, now)
        peer = self.lookup(rk.id)
        if peer is None:
            peer = Peer(rk.id, bytes(rk.uuid), bytes(rk.pk), ip, signed=True)
            self._remember(peer)
            changed = True
        elif peer.signed:
            if peer.pk != rk.pk:
                self.events["register_pk_key_mismatch"] += 1
                return self._signed_result(rk, o, R.KEY_MISMATCH, now)
            if not self._id_pk_allows(peer, now):
                return self._signed_result(rk, o, R.TOO_FREQUENT, now)
            changed = peer.uuid != rk.uuid or peer.last_ip != ip
        else:
            # Bound by an unsigned registration: only its uuid may take it over (and sign it from now on).
            if peer.uuid != rk.uuid:
                self.events["register_pk_uuid_mismatch"] += 1
                return self._signed_result(rk, o, R.UUID_MISMATCH, now)
            changed = True
        peer.uuid, peer.pk, peer.last_ip, peer.signed = bytes(rk.uuid), bytes(rk.pk), ip, True
        peer.pk_count += 1
        peer.pk_time = now
        self._route(peer, o, now)
        actions: list[Action] = []
        if changed:
            actions.append(Persist(PeerRow(peer.id, peer.uuid, peer.pk, ip, signed=True)))
        return actions + self._signed_result(rk, o, R.OK, now)

    def _register_unsigned(self, rk: Any, o: Origin, now: float) -> list[Action]:
        """RustDesk's RegisterPk, behind `allow_unsigned`: upstream's uuid rule, and never a signed binding."""
        R = pb.RegisterPkResponse
        src = o.src
        if not valid_id(rk.id):
            return self._pk_result(o, R.INVALID_ID_FORMAT, now)
        ip = src.host
        if not self.ip_allows(ip, rk.id, now):
            self.events["register_pk_ip_blocked"] += 1
            return self._pk_result(o, R.TOO_FREQUENT, now)
        peer = self.lookup(rk.id)
        actions: list[Action] = []
        if peer is None:
            peer = Peer(rk.id, bytes(rk.uuid), bytes(rk.pk), ip)
            self._remember(peer)
            changed = True
        elif peer.signed or peer.uuid != rk.uuid or (peer.last_ip and peer.last_ip != ip and peer.pk != rk.pk):
            # The ID belongs to the first uuid that registered it; the same uuid may move to a
            # new IP or change its key, but not both at once (upstream's rule). A signed binding
            # belongs to its key: no unsigned registration touches it.
            self.events["register_pk_uuid_mismatch"] += 1
            return self._pk_result(o, R.UUID_MISMATCH, now)
        else:
            if not self._id_pk_allows(peer, now):
                return self._pk_result(o, R.TOO_FREQUENT, now)
            changed = peer.pk != rk.pk or peer.last_ip != ip
            peer.pk = bytes(rk.pk)
            peer.last_ip = ip
        peer.pk_count += 1
        peer.pk_time = now
        self._route(peer, o, now)
        if changed:
            actions.append(Persist(PeerRow(peer.id, peer.uuid, peer.pk, ip)))
        return actions + self._pk_result(o, R.OK, now)

    def _hole_sent_udp(self, phs: Any, src: SockAddr, now: float) -> list[Action]:
        """B's UDP punch socket announced itself: its source is B's UDP mapping, A gets it (is_udp)."""
        a = self._demangle(phs.socket_addr)
        p = self.pending.get(a)
        if p is not None and p.udp_port <= 0:
            return self.drop("udp_hole_sent_without_udp_request", src, now)
        p = self._take(a, phs.id, bytes(phs.answer_token), src, now)
        if p is None:
            return []
        resp = pb.PunchHoleResponse(
            socket_addr=self._mangle(_seen_by_a(src, p), now),
            pk=self.signed_pk(p.target),
            relay_server=p.relay_server,
            nat_type=phs.nat_type,
            is_udp=True,
            socket_addr_v6=_v6(phs.socket_addr_v6),
            nat_behavior=NatBehavior.from_pb(phs.nat_behavior).to_pb(),
            birthday=p.birthday,
        )
        return [SendTcp(p.conn, messages.build(punch_hole_response=resp))]

    # ------------------------------------------------------------------ TCP

    def handle_tcp(
        self, conn: int, src: SockAddr, role: Role, payload: bytes, now: float, local: SockAddr | None = None
    ) -> list[Action]:
        """`local` is the server's address the connection came in on (where its client reached us)."""
        src = to_v4_if_mapped(src)
        try:
            kind, msg = messages.parse(payload, max_len=MAX_TCP_MESSAGE)
        except messages.MessageError as exc:
            return self.drop(exc.reason, src, now, f"tcp {role}")
        self.messages[f"tcp.{kind}"] += 1
        if kind == "test_nat_request":
            seen = pb.TestNatResponse(port=src.port, observed_ip=str(src.ip))
            return [SendTcp(conn, messages.build(test_nat_response=seen))]
        if kind == "online_request":
            return [SendTcp(conn, self._online(msg.peers, now))]
        if role != "main":
            return self.drop("wrong_kind", src, now, f"tcp nat-port {kind}")
        if kind == "punch_hole_request":
            return self._punch_request(conn, src, msg, payload, now, local)
        if kind == "request_relay":
            return self._relay_request(conn, src, msg, payload, now)
        if kind == "punch_hole_sent":
            return [*self._hole_sent_tcp(conn, src, msg, now), CloseTcp(conn)]
        if kind == "local_addr":
            return [*self._local_addr(src, msg, now), CloseTcp(conn)]
        if kind == "relay_response":
            return [*self._relay_response(src, msg, now), CloseTcp(conn)]
        if kind == "register_pk":  # registration over TCP: for agents whose UDP does not get through
            return self._register_pk(msg, payload, Origin(src, conn=conn), now)
        if kind == "register_peer":
            return self._register_peer(msg, Origin(src, conn=conn), now)
        return self.drop("wrong_kind", src, now, f"tcp {kind}")

    def _online(self, ids: Sequence[str], now: float) -> bytes:
        states = bytearray((len(ids) + 7) // 8)
        for i, peer_id in enumerate(ids):
            peer = self.peers.get(peer_id)
            if peer is not None and self.is_online(peer, now):
                states[i // 8] |= 0x80 >> (i % 8)
        return messages.build(online_response=pb.OnlineResponse(states=bytes(states)))

    def _requester(self, req: Any, payload: bytes, src: SockAddr, now: float) -> tuple[Requester | None, str]:
        """Who signed this request (None, "" for an unsigned one the server admits); or a refusal text."""
        if not req.requester_id:
            if self.allow_unsigned:
                return None, ""
            self.events["request_unsigned_refused"] += 1
            return None, "this rendezvous server takes only signed requests from registered punchthrough agents"
        shown = req.requester_id if valid_id(req.requester_id) else "?"
        peer = self.lookup(req.requester_id) if valid_id(req.requester_id) else None
        if peer is not None and peer.signed:
            key = peer.pk
        elif peer is None and valid_id(req.requester_id) and len(req.requester_pk) == signing.KEY_BYTES:
            # Not registered (its UDP may be blocked): its ID must be derived from the key it signs with.
            if derive_id(bytes(req.requester_pk), req.requester_salt) != req.requester_id:
                self.events["request_id_not_derived"] += 1
                return None, f"requester {shown} is not derived from the key it signs with"
            key = bytes(req.requester_pk)
        else:
            self.events["request_unknown_requester"] += 1
            return None, f"requester {shown} is not registered with a key at this server"
        body, sig = signing.split(payload)
        if not signing.verify(key, signing.REQUEST, b"", body, sig):
            self.events["request_bad_signature"] += 1
            self.drop("request_bad_signature", src, now, f"claiming {shown}")
            return None, f"the request is not signed by the key bound to {shown}"
        skew = now + self.wall_offset - req.request_time_ms / 1000.0
        if abs(skew) > REQUEST_WINDOW:
            self.events["request_stale"] += 1
            return None, f"the request's time is {skew:+.0f} s off this server's clock (check both clocks)"
        nonce = bytes(req.request_nonce)
        if len(nonce) != NONCE_BYTES or not self._fresh_nonce(req.requester_id, nonce, now):
            self.events["request_replayed"] += 1
            self.drop("request_replayed", src, now, f"from {shown}")
            return None, "the request was seen before (replayed)"
        return Requester(req.requester_id, key), ""

    def _fresh_nonce(self, peer_id: str, nonce: bytes, now: float) -> bool:
        """Remember `nonce` for as long as a request carrying it could be taken; False if seen."""
        lim = self.limits
        seen = self._nonces.get(peer_id)
        if seen is None:
            seen = self._nonces[peer_id] = OrderedDict()
            while len(self._nonces) > lim.max_nonce_ids:
                self._nonces.popitem(last=False)
        else:
            self._nonces.move_to_end(peer_id)
        while seen and next(iter(seen.values())) < now:
            seen.popitem(last=False)
        if nonce in seen:
            return False
        seen[nonce] = now + 2 * REQUEST_WINDOW
        while len(seen) > lim.max_nonces_per_id:
            seen.popitem(last=False)
        return True

    def _push(self, peer: Peer, member: str, push: Any, requester: Requester | None, token: bytes) -> Action:
        """A push to B: who asks and with which key, the token B's answer must carry; signed for B."""
        if requester is not None:
            push.requester_id = requester.id
            push.requester_pk = requester.pk
        push.answer_token = token
        body = messages.build(**{member: push})
        assert peer.addr is not None
        sealed = signing.seal(self.key, signing.PUSH, peer.id.encode(), body)
        if peer.tcp_conn:
            return SendTcp(peer.tcp_conn, sealed)
        return SendUdp(peer.addr, sealed, peer.via)

    def _ticket(self, uuid: str, relay: str, now: float) -> bytes:
        return signing.make_ticket(self.key, uuid, relay, int((now + self.wall_offset) * 1000))

    def _punch_request(
        self, conn: int, a: SockAddr, req: Any, payload: bytes, now: float, local: SockAddr | None = None
    ) -> list[Action]:
        Failure = pb.PunchHoleResponse

        def fail(failure: int, text: str = "") -> list[Action]:
            resp = pb.PunchHoleResponse(failure=failure, other_failure=text)  # type: ignore[arg-type]
            return [SendTcp(conn, messages.build(punch_hole_response=resp))]

        if req.licence_key and req.licence_key != self.public_key_b64:
            self.events["licence_mismatch"] += 1
            return fail(Failure.LICENSE_MISMATCH)
        requester, problem = self._requester(req, payload, a, now)
        if problem:
            return fail(Failure.ID_NOT_EXIST, problem)
        peer = self.lookup(req.id) if valid_id(req.id) else None
        if peer is None:
            self.events["punch_id_not_exist"] += 1
            return fail(Failure.ID_NOT_EXIST)
        if not self.is_online(peer, now) or peer.addr is None:
            self.events["punch_offline"] += 1
            return fail(Failure.OFFLINE)
        udp_port = req.udp_port if 0 < req.udp_port <= 0xFFFF else 0
        if udp_port and a.ip == peer.addr.ip and not (req.force_relay or self.always_relay):
            # Same LAN: the requester's TCP request fetches B's LAN address; a UDP punch would only
            # cost B a second push to answer (and a push token), so it is told at once.
            self.events["punch_udp_same_lan"] += 1
            return [SendTcp(conn, messages.build(punch_hole_response=pb.PunchHoleResponse(is_local=True)))]
        if not self._take_push_token(peer, now):
            return self.drop("push_rate_limited", a, now, f"to {peer.id}")
        relay = self.next_relay()
        token = self.new_token() if peer.signed else b""
        pending = Pending(conn, peer.id, now, udp_port=udp_port, relay_server=relay, token=token)
        pending.answer_ip = peer.addr.host
        if local is not None and peer.addr.ip.is_loopback and not a.ip.is_loopback:
            here = to_v4_if_mapped(local).ip
            if here.version == peer.addr.ip.version and not here.is_unspecified:
                pending.host_alias = here
        mangled_a = self._mangle(a, now)
        a_v6 = _v6(req.socket_addr_v6)
        a_behavior = NatBehavior.from_pb(req.nat_behavior)
        birthday = False
        if req.force_relay or self.always_relay:
            decision = "relay"
        elif a.ip == peer.addr.ip:
            decision = "lan"
        elif not a_v6 and (
            (req.nat_type == pb.SYMMETRIC and peer.nat_type == pb.SYMMETRIC)  # no IPv4 punch can work (an
            or not self._can_punch(req.nat_type, a_behavior, peer)  # IPv6 offer may still go direct)
        ):
            decision = "relay"
            if req.direct_only:  # a link on the relay looks for a direct path: only birthday probing is left
                if udp_port and birthday_role(a_behavior, peer.behavior) is not None:
                    decision, birthday = "punch", True
                    pending.birthday = True
                    self.events["punch_birthday"] += 1
                else:
                    self.events["punch_direct_only_hopeless"] += 1
                    return fail(Failure.ID_NOT_EXIST, "no direct path can meet between these two NATs")
            elif req.nat_type != pb.SYMMETRIC or peer.nat_type != pb.SYMMETRIC:
                self.events["punch_relay_by_behavior"] += 1
        else:
            decision = "punch"
        self.events[f"punch_{decision}"] += 1
        push: pb.RequestRelay | pb.FetchLocalAddr | pb.PunchHole
        if decision == "relay":
            pending.uuid = self.new_uuid()
            pending.ticket = self._ticket(pending.uuid, relay, now)
            member, push = "request_relay", pb.RequestRelay(
                id=peer.id,
                uuid=pending.uuid,
                socket_addr=mangled_a,
                relay_server=relay,
                secure=True,
                conn_type=req.conn_type,
                ticket=pending.ticket,
            )
        elif decision == "lan":
            member, push = "fetch_local_addr", pb.FetchLocalAddr(
                socket_addr=mangled_a, relay_server=relay, socket_addr_v6=a_v6
            )
        else:
            member, push = "punch_hole", pb.PunchHole(
                socket_addr=mangled_a,
                relay_server=relay,
                nat_type=req.nat_type,
                udp_port=udp_port,
                force_relay=req.force_relay,
                socket_addr_v6=a_v6,
                nat_behavior=a_behavior.to_pb(),
                birthday=birthday,
            )
        self._park(conn, a, pending)
        return [self._push(peer, member, push, requester, token)]

    @staticmethod
    def _can_punch(a_nat: int, a: NatBehavior, b: Peer) -> bool:
        """Does theory leave any punch (UDP or TCP) between A and B? Unmeasured counts as yes."""
        return punch_outlook(a, b.behavior).possible or tcp_outlook(a_nat, b.nat_type, a, b.behavior).possible

    def _relay_request(self, conn: int, a: SockAddr, rr: Any, payload: bytes, now: float) -> list[Action]:
        """A asks for a relay directly: the server picks the relay (whatever A named) and the uuid,
        and pushes B a RequestRelay with A's address filled in and the pair's ticket."""

        def refuse(reason: str) -> list[Action]:
            resp = pb.RelayResponse(uuid=rr.uuid, refuse_reason=reason)
            return [SendTcp(conn, messages.build(relay_response=resp))]

        if len(rr.uuid) > MAX_RELAY_UUID or len(rr.relay_server) > MAX_RELAY_SERVER:
            return self.drop("field_too_long", a, now, "request_relay")
        requester, problem = self._requester(rr, payload, a, now)
        if problem:
            return refuse(problem)
        peer = self.lookup(rr.id) if valid_id(rr.id) else None
        if peer is None:
            return refuse("ID does not exist")
        if not self.is_online(peer, now) or peer.addr is None:
            return refuse("Remote desktop is offline")
        if not self._take_push_token(peer, now):
            return self.drop("push_rate_limited", a, now, f"to {peer.id}")
        relay = self.next_relay()
        # A signed requester gets a uuid of the server's (A learns it from the answer); a RustDesk
        # client (unsigned, allowed by flag) joins the relay with the uuid it chose, so keep that one.
        uuid = rr.uuid if requester is None and rr.uuid else self.new_uuid()
        token = self.new_token() if peer.signed else b""
        pending = Pending(
            conn, peer.id, now, relay_server=relay, uuid=uuid, ticket=self._ticket(uuid, relay, now), token=token
        )
        pending.answer_ip = peer.addr.host
        push = pb.RequestRelay(
            id=peer.id,
            uuid=pending.uuid,
            socket_addr=self._mangle(a, now),
            relay_server=relay,
            secure=rr.secure,
            conn_type=rr.conn_type,
            ticket=pending.ticket,
        )
        self._park(conn, a, pending)
        self.events["relay_request_forwarded"] += 1
        return [self._push(peer, "request_relay", push, requester, token)]

    def _hole_sent_tcp(self, conn: int, b: SockAddr, phs: Any, now: float) -> list[Action]:
        p = self._take(self._demangle(phs.socket_addr), phs.id, bytes(phs.answer_token), b, now)
        if p is None:
            return []
        resp = pb.PunchHoleResponse(
            socket_addr=self._mangle(_seen_by_a(b, p), now),
            pk=self.signed_pk(p.target),
            relay_server=p.relay_server,
            nat_type=phs.nat_type,
            socket_addr_v6=_v6(phs.socket_addr_v6),
            nat_behavior=NatBehavior.from_pb(phs.nat_behavior).to_pb(),
        )
        return [SendTcp(p.conn, messages.build(punch_hole_response=resp))]

    def _local_addr(self, b: SockAddr, la: Any, now: float) -> list[Action]:
        if not la.local_addr or len(la.local_addr) > V6_MANGLED_LEN:
            return self.drop("bad_local_addr", b, now)
        p = self._take(self._demangle(la.socket_addr), la.id, bytes(la.answer_token), b, now)
        if p is None:
            return []
        resp = pb.PunchHoleResponse(
            socket_addr=la.local_addr,
            pk=self.signed_pk(p.target),
            relay_server=p.relay_server,
            is_local=True,
            socket_addr_v6=_v6(la.socket_addr_v6),
        )
        return [SendTcp(p.conn, messages.build(punch_hole_response=resp))]

    def _relay_response(self, b: SockAddr, rr: Any, now: float) -> list[Action]:
        """B's answer to a relay push (or to a punch push, when B chooses the relay): A gets the
        server's relay, uuid and ticket and B's key from the registry; of B's message only its
        refusal reason is passed on."""
        has_id = rr.WhichOneof("union") == "id"
        p = self._take(self._demangle(rr.socket_addr), rr.id if has_id else None, bytes(rr.answer_token), b, now)
        if p is None:
            return []
        if rr.refuse_reason:  # B turns A away (whatever the push was): A hears why at once
            self.events["answer_refused"] += 1
            refusal = pb.RelayResponse(uuid=p.uuid, refuse_reason=_clean(rr.refuse_reason, MAX_REFUSE_REASON))
            return [SendTcp(p.conn, messages.build(relay_response=refusal))]
        if not p.uuid:  # B chose the relay in answer to a punch: it joins with its uuid
            if not rr.uuid or len(rr.uuid) > MAX_RELAY_UUID:
                return self.drop("relay_response_without_uuid", b, now)
            p.uuid = rr.uuid
            p.ticket = self._ticket(p.uuid, p.relay_server, now)
        out = pb.RelayResponse(
            uuid=p.uuid,
            relay_server=p.relay_server,
            refuse_reason=_clean(rr.refuse_reason, MAX_REFUSE_REASON),
            version=rr.version,
            ticket=p.ticket,
        )
        out.pk = self.signed_pk(p.target)
        return [SendTcp(p.conn, messages.build(relay_response=out))]

    # ------------------------------------------------------------------ stats

    def stats(self, now: float) -> dict[str, Any]:
        online = sum(1 for peer in self.peers.values() if self.is_online(peer, now))
        return {
            "messages": dict(self.messages),
            "drops": self.drops.snapshot(),
            "events": dict(self.events),
            "peers_in_memory": len(self.peers),
            "peers_online": online,
            "pending_requests": len(self.pending),
            "relays": {r: {"up": s.up, "load": s.load, "misses": s.misses} for r, s in self.relay_state.items()},
            "ip_limiter_entries": len(self.ip_states),
        }
