"""Parsing and building RendezvousMessage envelopes, sans-IO.

The servers and the agent see a message as (kind, sub-message). Anything that
does not parse, or parses to an envelope with no member set, is a MessageError:
the caller drops it and counts it under the returned reason.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import DecodeError

from agent.proto import rendezvous_pb2 as pb

RendezvousMessage = pb.RendezvousMessage

MAX_UDP_MESSAGE = 2048
"""Upper bound on one rendezvous datagram we bother to parse (real ones are < 300 bytes)."""


class MessageError(ValueError):
    """A payload that is not a usable RendezvousMessage; `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def parse(data: bytes, max_len: int = MAX_UDP_MESSAGE) -> tuple[str, Any]:
    """Return (member name, sub-message) of a serialized RendezvousMessage."""
    if len(data) > max_len:
        raise MessageError("oversized", f"{len(data)} bytes")
    msg = pb.RendezvousMessage()
    try:
        msg.ParseFromString(data)
    except (DecodeError, RecursionError, ValueError) as exc:
        raise MessageError("malformed", str(exc)[:80]) from None
    kind = msg.WhichOneof("union")
    if kind is None:
        raise MessageError("empty")
    return kind, getattr(msg, kind)


def build(**member: Any) -> bytes:
    """`build(punch_hole=pb.PunchHole(...))` -> serialized envelope with that one member."""
    if len(member) != 1:
        raise TypeError("exactly one member")
    ((name, sub),) = member.items()
    msg = pb.RendezvousMessage()
    getattr(msg, name).CopyFrom(sub)
    return msg.SerializeToString()
