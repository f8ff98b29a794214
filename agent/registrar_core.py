"""The registrar's state machine (client side of RustDesk registration, section 6.1), sans-IO.

It decides what to send to the rendezvous server and when, from the replies it
is fed and the time it is given; the asyncio shell (agent/registrar.py) only
moves datagrams and calls `datagrams_to_send(now)` on its 1 s tick and after
every datagram. The rules follow `rendezvous_mediator.rs start_udp`:

* RegisterPk {id, uuid, pk} until the server confirms the key, then RegisterPeer
  {id, serial, nat_type} whenever the last reply is `interval` seconds old;
* an unanswered send is repeated after a reply timeout that grows (3 s, 6 s, ...
  30 s) while the server stays silent, so a dead server costs little traffic;
* RegisterPeerResponse.request_pk (new or restarted server) -> RegisterPk at once;
* TOO_FREQUENT -> hold off (6 s, doubling to 60 s: the server's per-ID window);
* UUID_MISMATCH -> the ID belongs to someone else: stop until the shell supplies
  a new identity (`set_identity`), then RegisterPk again.

Pushes from the server (PunchHole, FetchLocalAddr, RequestRelay, ...) come out
as `Push` events; a repeat of the same push within 100 ms is dropped as RustDesk
does, because the server may resend while a peer retries.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from agent import addr as addrmangle
from agent import messages
from agent.addr import SockAddr, to_v4_if_mapped
from agent.messages import MessageError
from agent.proto import rendezvous_pb2 as pb
from agent.stats import DropStats

REPLY_KINDS = frozenset({"register_peer_response", "register_pk_response"})

# States reported by status(); "error: NAME" is used for other RegisterPk results.
REGISTERING = "registering"
REGISTERED = "registered"
UNREACHABLE = "unreachable"
ID_TAKEN = "id_taken (waiting for a new id)"
BACKING_OFF = "backing_off (server says too frequent)"

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
class KeyRequested:
    """The server asked for our key although it had confirmed it: it saw us at a new IP, or restarted."""

    peer_id: str


Event = Push | IdTaken | Registered | StateChanged | KeyRequested


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


class RegistrarCore:
    """Registration state machine. Times are seconds on any monotonic clock."""

    def __init__(
        self,
        server: SockAddr,
        peer_id: str,
        uuid: bytes,
        public_key: bytes,
        *,
        interval: float = 4.0,
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
        self.public_key = public_key
        self.interval = interval
        self.reply_timeout = reply_timeout
        self.max_backoff = max_backoff
        self.backoff_factor = backoff_factor
        self.unreachable_after = unreachable_after
        self.too_frequent_hold = too_frequent_hold
        self.too_frequent_max = too_frequent_max
        self.error_hold = error_hold

        self.nat_type = 0
        self.serial = 0
        self.state = REGISTERING
        self.confirmed = False
        self._outstanding_since: float | None = None
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

    def set_identity(self, peer_id: str, uuid: bytes, public_key: bytes) -> None:
        """Switch to a new identity (after UUID_MISMATCH): the new ID must be registered from scratch."""
        self.peer_id, self.uuid, self.public_key = peer_id, uuid, public_key
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
        self._outstanding_since = None
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
            self._on_reply(now)
            if sub.request_pk:
                # New or restarted server: it does not know our key (or saw our IP change).
                if self.confirmed:
                    self._events.append(KeyRequested(self.peer_id))
                self.confirmed = False
                self._send_now = True
                self._set_state(REGISTERING)
            elif self.confirmed:
                self._set_state(REGISTERED)
        elif kind == "register_pk_response":
            self._on_reply(now)
            self._on_pk_result(sub.result, now)
        else:
            if kind == "configure_update" and sub.serial > self.serial:
                self.serial = sub.serial
            self._on_push(kind, sub, now)

    # -- outputs --------------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """At most one registration datagram, when one is due at `now`."""
        if self._waiting_identity:
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
        if self.confirmed:
            self.sent_peer += 1
            msg = pb.RegisterPeer(id=self.peer_id, serial=self.serial, nat_type=self.nat_type)  # type: ignore[arg-type]
            return [messages.build(register_peer=msg)]
        self.sent_pk += 1
        return [messages.build(register_pk=pb.RegisterPk(id=self.peer_id, uuid=self.uuid, pk=self.public_key))]

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
            "registrations_sent": self.sent_pk + self.sent_peer,
            "register_pk_sent": self.sent_pk,
            "register_peer_sent": self.sent_peer,
            "replies": self.replies,
            "consecutive_timeouts": self._timeouts,
            "last_result": self.last_result,
            "pushes_received": self.pushes,
            "duplicate_pushes": self.duplicates,
            "drops": self.drops.snapshot(),
        }

    # -- internals ------------------------------------------------------------------------------

    def _on_reply(self, now: float) -> None:
        self.replies += 1
        self._last_reply = now
        self._outstanding_since = None
        self._timeouts = 0
        if self.state == UNREACHABLE:
            self._set_state(REGISTERED if self.confirmed else REGISTERING)

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
        elif result == R.UUID_MISMATCH:
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
