"""A link's frames, numbered and kept until the peer has them, so a link outlives its transport (sans-IO).

Each secure frame on a link carries one plaintext record: `kind u8, body`.
- DATA (0): `u64` (how many DATA records the sender has received: an acknowledgement riding along),
  then a batch of whole multiplexer frames. DATA records are numbered 1, 2, ... per direction for
  the link's whole life (not per transport), and each is kept here until acknowledged.
- ACK (1): `u64`, the same count alone, for when there is no data to carry it. An ACK is not itself
  numbered or kept: a later one says the same and more.

Why acknowledgements ride on DATA: a request and its answer were four sealed frames (each DATA
record drew an ACK back), and each costs an AEAD call, a loop turn and syscalls on both ends; now
they are two. A side with nothing to send acknowledges on its own after ACK_EVERY records, or when
the link's delayed-ACK timer fires (agent/link/link.py).

When a link moves to another transport (a better path, the same path after a network change, or
the relay after a direct path died), each side first stops reading the old transport, then tells
the other how many DATA records it has (`received`); each resends what the other lacks
(`resume`), re-sealed on the new transport's keys. Nothing is lost (what the old transport dropped
is resent), duplicated (what arrived is not resent) or reordered (records go out in number order).

Kept bytes are bounded: the writer stops taking new records beyond MAX_UNACKED (`full`), and the
receiver acknowledges every ACK_EVERY records, or whatever it has once a read is done (`ack_due`).
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field

DATA = 0
ACK = 1
_COUNT = struct.Struct("!Q")
_DATA_PREFIX = bytes([DATA])
DATA_OVERHEAD = 1 + 8
"""A DATA record's bytes before its multiplexer frames: the kind and the acknowledgement."""
MAX_UNACKED = 8 * 1024 * 1024
"""Bytes sent and not yet acknowledged, at most (more waits): what a move may have to resend."""
ACK_EVERY = 8
"""Records received before an ACK goes out without waiting for the end of a read."""


class ResendError(Exception):
    """The peer broke the record protocol (an unknown kind, an ACK for records never sent)."""


@dataclass
class Resend:
    sent: int = 0
    """DATA records sent (the number of the last one)."""
    acked: int = 0
    """DATA records the peer has acknowledged."""
    received: int = 0
    """DATA records received from the peer."""
    ack_sent: int = 0
    """The highest `received` we have told the peer."""
    kept: deque[bytes] = field(default_factory=deque)
    """Records acked+1 .. sent, as sent (kind byte included)."""
    kept_bytes: int = 0

    def data(self, *frames: bytes) -> bytes:
        """The record for a batch of multiplexer frames (kept until acknowledged), carrying our count
        of the peer's records: one copy, the join."""
        record = b"".join((_DATA_PREFIX, _COUNT.pack(self.received), *frames))
        self.ack_sent = self.received
        self.sent += 1
        self.kept.append(record)
        self.kept_bytes += len(record)
        return record

    @property
    def full(self) -> bool:
        return self.kept_bytes >= MAX_UNACKED

    def receive(self, record: bytes) -> memoryview | None:
        """The multiplexer bytes in a DATA record (a view, not a copy); None for an ACK (taken into
        account here)."""
        if not record:
            raise ResendError("an empty record")
        kind = record[0]
        if kind == DATA and len(record) >= DATA_OVERHEAD:
            (count,) = _COUNT.unpack_from(record, 1)
            self._acknowledged(count)  # raises before the record is counted: a refused one is not
            self.received += 1
            return memoryview(record)[DATA_OVERHEAD:]
        if kind == ACK and len(record) == 1 + _COUNT.size:
            (count,) = _COUNT.unpack_from(record, 1)
            self._acknowledged(count)
            return None
        raise ResendError(f"a record of kind {kind} and {len(record)} bytes")

    def ack_due(self, read_done: bool) -> bytes | None:
        """An ACK record if one should go out now: ACK_EVERY records unacknowledged, or any once the
        reader has nothing more to process."""
        owed = self.received - self.ack_sent
        if owed >= ACK_EVERY or (owed and read_done):
            self.ack_sent = self.received
            return bytes([ACK]) + _COUNT.pack(self.received)
        return None

    def resume(self, peer_received: int) -> list[bytes]:
        """Moving to a new transport: the peer has `peer_received` of our records; what to resend, in
        order. The peer's word is checked: it cannot claim records we never sent or had acknowledged."""
        if not self.acked <= peer_received <= self.sent:
            raise ResendError(
                f"the peer resumes at record {peer_received}, outside {self.acked}..{self.sent} (what it may lack)"
            )
        self._acknowledged(peer_received)
        self.ack_sent = self.received  # the resume told the peer our count
        return list(self.kept)

    def _acknowledged(self, count: int) -> None:
        if count > self.sent:
            raise ResendError(f"an ACK for record {count}, beyond the {self.sent} sent")
        while self.acked < count:
            self.kept_bytes -= len(self.kept.popleft())
            self.acked += 1


def encode_count(count: int) -> bytes:
    return _COUNT.pack(count)


def decode_count(data: bytes) -> int:
    if len(data) != _COUNT.size:
        raise ResendError(f"a record count of {len(data)} bytes")
    return int(_COUNT.unpack(data)[0])
