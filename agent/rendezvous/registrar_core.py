"""The registrar's state machine (client side of RustDesk registration, section 6.1), sans-IO.

It decides what to send to the rendezvous server and when, from the replies it
is fed and the time it is given; the asyncio shell (agent/rendezvous/registrar.py) only
moves datagrams and calls `datagrams_to_send(now)` on its 1 s tick and after
every datagram. The rules follow `rendezvous_mediator.rs start_udp`:

* RegisterPk {id, uuid, pk} until the server confirms the key, then RegisterPeer
  {id, serial, nat_type} whenever the last reply is `interval` seconds old;
* a RegisterPk is signed (agent/wire/signing.py): the first one of an attempt carries a
  fresh nonce and asks for a challenge; the server answers CHALLENGE, signed with its
  key for our nonce. That key must be the one we expect (configured, or pinned on first
  contact: then we learn it here and the shell pins it, as ssh's known_hosts); a server
  presenting another key is refused and registration stops. The second RegisterPk
  carries the challenge and our signature; only a signed OK confirms it;
* an unanswered send is repeated after a reply timeout that grows (3 s, 6 s, ...
  30 s) while the server stays silent, so a dead server costs little traffic;
* RegisterPeerResponse.request_pk (new or restarted server) -> RegisterPk at once;
* TOO_FREQUENT -> hold off (6 s, doubling to 60 s: the server's per-ID window);
* UUID_MISMATCH / KEY_MISMATCH -> the ID belongs to someone else: stop until the
  shell supplies a new identity (`set_identity`), then RegisterPk again.

Pushes from the server (PunchHole, FetchLocalAddr, RequestRelay, ...) come out
as `Push` events only when the server signed them for our ID; a repeat of the same
push within 100 ms is dropped as RustDesk does, because the server may resend while
a peer retries.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nacl.signing import SigningKey

from agent.common.stats import DropStats
from agent.proto import rendezvous_pb2 as pb
from agent.wire import addr as addrmangle
from agent.wire import messages, signing
from agent.wire.addr import SockAddr, to_v4_if_mapped
from agent.wire.messages import MessageError
from agent.wire.peer_ids import fingerprint

REPLY_KINDS = frozenset({"register_peer_response", "register_pk_response"})

# States reported by status(); "error: NAME" is used for other RegisterPk results.
REGISTERING = "registering"
REGISTERED = "registered"
UNREACHABLE = "unreachable"
ID_TAKEN = "id_taken (waiting for a new id)"
BACKING_OFF = "backing_off (server says too frequent)"
SERVER_KEY_REFUSED = "server_key_refused"

REGISTER_PK_SIZE = 192
"""An unsigned RegisterPk is padded to this many bytes: the server's signed CHALLENGE answer (~130
bytes) may never be larger than the request it answers."""
DUPLICATE_WINDOW = 0.1
"""Seconds within which a repeated push is a duplicate (RustDesk: 100 ms)."""
MAX_RECENT_PUSHES = 256
"""Bound on the duplicate filter's memory; a flood only evicts old entries."""


@dataclass(frozen=True)
class Push:
    """A server push for the agent: kind is the RendezvousMessage member name."""

    kind: str
    message: Any


@dataclass(frozen=True)
class IdTaken:
    """The server bound our ID to another uuid: the shell must pick a new ID."""

    peer_id: str


@dataclass(frozen=True)
class Registered:
    """The server confirmed our key (first time or again after a restart)."""

    peer_id: str


@dataclass(frozen=True)
class StateChanged:
    old: str
    new: str


@dataclass(frozen=True)
class ServerKeyLearned:
    """No server key was expected: this one signed its answer (the shell pins it, trust on first use)."""

    key: bytes


@dataclass(frozen=True)
class ServerKeyRefused:
    """The server signed with another key than the expected one: registration stops."""

    expected: bytes
    presented: bytes


@dataclass(frozen=True)
class KeyRequested:
    """The server asked for our key although it had confirmed it: it saw us at a new IP, or restarted."""

    peer_id: str


Event = Push | IdTaken | Registered | StateChanged | KeyRequested | ServerKeyLearned | ServerKeyRefused


def _push_key(kind: str, message: Any) -> bytes:
    """Identity of a push for duplicate filtering.

    IPv4 socket_addr bytes carry a timestamp (AddrMangle), so two sends of the
    same push differ on the wire; compare the decoded address plus every other field.
    """
    copy = type(message)()
    copy.CopyFrom(message)
    decoded = b""
    if "socket_addr" in copy.DESCRIPTOR.fields_by_name:
        decoded = str(addrmangle.decode(copy.socket_addr)).encode()
        copy.ClearField("socket_addr")
    body: bytes = copy.SerializeToString(deterministic=True)
    return kind.encode() + b"\0" + decoded + b"\0" + body


HEARTBEAT_INTERVAL = 4.0
"""Seconds between RegisterPeer heartbeats (once the last reply is this old). The server counts a
peer online for 30 s after its last one, so up to seven may be lost in a row; this rate is what
sizes a rendezvous server (docs/rendezvous-scaling.md)."""


class RegistrarCore:
    """Registration state machine. Times are seconds on any monotonic clock."""

    def __init__(
        self,
        server: SockAddr,
        peer_id: str,
        uuid: bytes,
        signing_key: SigningKey,
        *,
        salt: int = 0,
        server_key: bytes | None = None,
        token_bytes: Callable[[int], bytes] = secrets.token_bytes,
        interval: float = HEARTBEAT_INTERVAL,
        reply_timeout: float = 3.0,
        max_backoff: float = 30.0,
        backoff_factor: float = 2.0,
        unreachable_after: int = 2,
        too_frequent_hold: float = 6.0,
        too_frequent_max: float = 60.0,
        error_hold: float = 30.0,
    ) -> None:
        if interval <= 0 or reply_timeout <= 0 or max_backoff < reply_timeout or backoff_factor < 1:
            raise ValueError("need interval > 0, reply_timeout > 0, max_backoff >= reply_timeout, backoff_factor >= 1")
        self.server = to_v4_if_mapped(server)
        self.peer_id = peer_id
        self.uuid = uuid
        self.signing_key = signing_key
        self.salt = salt
        self.server_key = server_key
        """The key the server must sign with; None until learned (trust on first use)."""
        self.server_key_learned = False
        self.token_bytes = token_bytes
        self._nonce = b""
        self._challenge = b""
        self.interval = interval
        self.reply_timeout = reply_timeout
        self.max_backoff = max_backoff
        self.backoff_factor = backoff_factor
        self.unreachable_after = unreachable_after
        self.too_frequent_hold = too_frequent_hold
        self.too_frequent_max = too_frequent_max
        self.error_hold = error_hold

        self.nat_type = 0
        self.nat_behavior = b""
        """RegisterPeer.nat_behavior, serialized (empty: not measured)."""
        self.serial = 0
        self.state = REGISTERING
        self.confirmed = False
        self._outstanding_since: float | None = None
        self._silent_since: float | None = None
        self._timeouts = 0  # consecutive unanswered sends
        self._last_reply: float | None = None
        self._send_now = True
        self._hold_until: float | None = None
        self._hold_count = 0
        self._waiting_identity = False
        self._recent: OrderedDict[bytes, float] = OrderedDict()
        self._events: list[Event] = []

        self.drops = DropStats()
        self.sent_pk = 0
        self.sent_peer = 0
        self.replies = 0
        self.pushes = 0
        self.duplicates = 0
        self.last_result = ""

    # -- inputs ---------------------------------------------------------------------------------

    def set_nat_type(self, nat_type: int) -> None:
        """A changed NAT type is announced at once so the server's view stays current."""
        if nat_type != self.nat_type:
            self.nat_type = nat_type
            if self.confirmed:
                self._send_now = True

    def set_nat_behavior(self, behavior: pb.NatBehavior) -> None:
        """Likewise the UDP behaviour: the server relays at once when it shows no punch can work."""
        wire = behavior.SerializeToString(deterministic=True)
        if wire != self.nat_behavior:
            self.nat_behavior = wire
            if self.confirmed:
                self._send_now = True

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    def set_identity(self, peer_id: str, uuid: bytes, signing_key: SigningKey, salt: int) -> None:
        """Switch to a new identity (after UUID_MISMATCH): the new ID must be registered from scratch."""
        self.peer_id, self.uuid, self.signing_key, self.salt = peer_id, uuid, signing_key, salt
        self._challenge = b""
        self._waiting_identity = False
        self.confirmed = False
        self._outstanding_since = None
        self._send_now = True
        self._set_state(REGISTERING)

    def reregister(self) -> None:
        """Our network changed: send RegisterPk at once, so the server stores our new address now
        instead of at the next heartbeat (a RegisterPeer from a new IP costs a round trip more:
        the server answers it with request_pk)."""
        if self._waiting_identity:
            return
        self.confirmed = False
        self._challenge = b""
        self._outstanding_since = None
        self._silent_since = None
        self._timeouts = 0
        self._send_now = True
        self._set_state(REGISTERING)

    def receive_datagram(self, data: bytes, source: SockAddr, now: float) -> None:
        """Feed one datagram; results come out of `next_events()` and `datagrams_to_send()`."""
        if to_v4_if_mapped(source) != self.server:
            self._drop("foreign_source", source, now)
            return
        try:
            kind, sub = messages.parse(data)
        except MessageError as exc:
            self._drop(exc.reason, source, now)
            return
        if kind == "register_peer_response":
            if self.state == SERVER_KEY_REFUSED:
                return
            self._on_reply(now)
            if sub.request_pk:
                # New or restarted server: it does not know our key (or saw our address change).
                if self.confirmed:
                    self._events.append(KeyRequested(self.peer_id))
                self.confirmed = False
                self._challenge = b""
                self._send_now = True
                self._set_state(REGISTERING)
            elif self.confirmed:
                self._set_state(REGISTERED)
        elif kind == "register_pk_response":
            self._on_pk_response(sub, data, source, now)
        else:
            if self.server_key is None:
                self._drop("push_before_server_key", source, now)
                return
            try:
                signing.opened(self.server_key, signing.PUSH, self.peer_id.encode(), data)
            except signing.SignatureError:
                self._drop("unsigned_push", source, now)
                return
            if kind == "configure_update" and sub.serial > self.serial:
                self.serial = sub.serial
            self._on_push(kind, sub, now)

    # -- outputs --------------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """At most one registration datagram, when one is due at `now`."""
        if self._waiting_identity or self.state == SERVER_KEY_REFUSED:
            return []
        if self._hold_until is not None:
            if now < self._hold_until:
                return []
            self._hold_until = None
            self._send_now = True
        due = self._send_now
        if not due and self._outstanding_since is not None:
            if now - self._outstanding_since >= self.current_timeout():
                self._timeouts += 1
                if self._timeouts >= self.unreachable_after:
                    self._set_state(UNREACHABLE)
                due = True
        elif not due:
            due = self._last_reply is None or now - self._last_reply >= self.interval
        if not due:
            return []
        self._send_now = False
        self._outstanding_since = now
        if self._silent_since is None:
            self._silent_since = now
        if self.confirmed:
            self.sent_peer += 1
            msg = pb.RegisterPeer(id=self.peer_id, serial=self.serial, nat_type=self.nat_type)  # type: ignore[arg-type]
            if self.nat_behavior:
                msg.nat_behavior.ParseFromString(self.nat_behavior)
            return [messages.build(register_peer=msg)]
        self.sent_pk += 1
        return [self._register_pk()]

    def _register_pk(self) -> bytes:
        """Signed with the server's challenge when we have one; else a padded request for one."""
        if not self._challenge or not self._nonce:
            self._nonce = self.token_bytes(16)
        rk = pb.RegisterPk(
            id=self.peer_id,
            uuid=self.uuid,
            pk=self.public_key,
            id_salt=self.salt,
            nonce=self._nonce,
            challenge=self._challenge,
        )
        if self._challenge:
            return signing.seal(self.signing_key, signing.REGISTER, b"", messages.build(register_pk=rk))
        size = len(messages.build(register_pk=rk))
        rk.padding = bytes(max(0, REGISTER_PK_SIZE - size - 3))
        return messages.build(register_pk=rk)

    def unanswered_for(self, now: float) -> float | None:
        """How long registrations have gone unanswered: since the first send after the last reply (or
        since `reregister`); None when nothing is waiting for an answer."""
        return None if self._silent_since is None else now - self._silent_since

    def next_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def current_timeout(self) -> float:
        """Reply timeout for the send now outstanding: grows with each unanswered send."""
        return min(self.reply_timeout * self.backoff_factor**self._timeouts, self.max_backoff)

    def status(self, now: float) -> dict[str, Any]:
        return {
            "state": self.state,
            "id": self.peer_id,
            "server": str(self.server),
            "confirmed": self.confirmed,
            "nat_type": self.nat_type,
            "last_reply_age": None if self._last_reply is None else round(now - self._last_reply, 3),
            "unanswered_for": None if self._outstanding_since is None else round(now - self._outstanding_since, 3),
            "registrations_sent": self.sent_pk + self.sent_peer,
            "register_pk_sent": self.sent_pk,
            "register_peer_sent": self.sent_peer,
            "replies": self.replies,
            "consecutive_timeouts": self._timeouts,
            "last_result": self.last_result,
            "server_key": fingerprint(self.server_key) if self.server_key else "",
            "server_key_learned": self.server_key_learned,
            "pushes_received": self.pushes,
            "duplicate_pushes": self.duplicates,
            "drops": self.drops.snapshot(),
        }

    # -- internals ------------------------------------------------------------------------------

    def _on_reply(self, now: float) -> None:
        self.replies += 1
        self._last_reply = now
        self._outstanding_since = None
        self._silent_since = None
        self._timeouts = 0
        if self.state == UNREACHABLE:
            self._set_state(REGISTERED if self.confirmed else REGISTERING)

    def _on_pk_response(self, resp: Any, data: bytes, source: SockAddr, now: float) -> None:
        """Only an answer signed for this attempt's nonce counts; the first one may teach us the key."""
        if self.state == SERVER_KEY_REFUSED or not self._nonce:
            self._drop("unexpected_register_pk_response", source, now)
            return
        R = pb.RegisterPkResponse
        key = self.server_key
        presented = bytes(resp.server_key)
        if key is None and resp.result == R.CHALLENGE and len(presented) == signing.KEY_BYTES:
            key = presented
        if key is None:
            self._drop("unsigned_register_pk_response", source, now)
            return
        try:
            signing.opened(key, signing.SERVER, self._nonce, data)
        except signing.SignatureError:
            if resp.result == R.CHALLENGE and self.server_key is not None and len(presented) == signing.KEY_BYTES:
                try:  # signed, but with another key than the one we trust: a different server
                    signing.opened(presented, signing.SERVER, self._nonce, data)
                except signing.SignatureError:
                    pass
                else:
                    self._on_reply(now)
                    self._set_state(SERVER_KEY_REFUSED)
                    self._events.append(ServerKeyRefused(self.server_key, presented))
                    return
            self._drop("bad_register_pk_response_signature", source, now)
            return
        if self.server_key is None:
            self.server_key = key
            self.server_key_learned = True
            self._events.append(ServerKeyLearned(key))
        self._on_reply(now)
        if resp.result == R.CHALLENGE:
            self._challenge = bytes(resp.challenge)
            self._send_now = True
            self.last_result = "CHALLENGE"
            return
        self._challenge = b""  # the next attempt asks for a new one (and gets a new nonce)
        self._on_pk_result(resp.result, now)

    def _on_pk_result(self, result: int, now: float) -> None:
        R = pb.RegisterPkResponse
        self.last_result = R.Result.Name(result) if result in R.Result.values() else str(result)
        if result == R.OK:
            self._hold_count = 0
            first = not self.confirmed
            self.confirmed = True
            # A RegisterPeer right away: after a server restart RegisterPk alone may not refresh
            # our address and registration time (section 6.1), RegisterPeer does.
            self._send_now = first
            self._set_state(REGISTERED)
            if first:
                self._events.append(Registered(self.peer_id))
        elif result in (R.UUID_MISMATCH, R.KEY_MISMATCH):
            self.confirmed = False
            self._waiting_identity = True
            self._send_now = False
            self._set_state(ID_TAKEN)
            self._events.append(IdTaken(self.peer_id))
        elif result == R.TOO_FREQUENT:
            hold = min(self.too_frequent_hold * 2**self._hold_count, self.too_frequent_max)
            self._hold_count += 1
            self._hold_until = now + hold
            self._set_state(BACKING_OFF)
        else:
            # NOT_DEPLOYED (RustDesk: one RegisterPk per 30 s), SERVER_ERROR, ID_EXISTS, ...: retry slowly.
            self.confirmed = False
            self._hold_until = now + self.error_hold
            self._set_state(f"error: {self.last_result}")

    def _on_push(self, kind: str, sub: Any, now: float) -> None:
        key = _push_key(kind, sub)
        for old_key, seen in list(self._recent.items()):
            if now - seen < DUPLICATE_WINDOW:
                break
            del self._recent[old_key]
        seen_at = self._recent.get(key)
        if seen_at is not None and now - seen_at < DUPLICATE_WINDOW:
            self.duplicates += 1
            return
        self._recent[key] = now
        self._recent.move_to_end(key)
        while len(self._recent) > MAX_RECENT_PUSHES:
            self._recent.popitem(last=False)
        self.pushes += 1
        self._events.append(Push(kind, sub))

    def _drop(self, reason: str, source: SockAddr, now: float) -> None:
        self.drops.drop(reason, str(source), now)

    def _set_state(self, new: str) -> None:
        if new != self.state:
            self._events.append(StateChanged(self.state, new))
            self.state = new
